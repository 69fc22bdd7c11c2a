"""How well Ray Data feeds a model actor whose forward pass waits on a GPU: side by side in one run.

    .ci/in-venv python benchmarks/actor_feed.py [--n 2048] [--batch 256] [--decode-batch 64 256]
                                                [--calls 1 2] [--forward-ms 87] [--rounds 2]

Why: on an H100 the scoring job reached ~2,000 sheets/s where the compiled model alone does 2,944
(docs/benchmarks.md). Part of the gap is what the actor does between forward passes: fetch the
decoded blocks, stitch them into a batch (with ``score.decode_batch`` 64 and a model batch of 256,
four blocks of 26 MB each are copied into one 105 MB batch), and ship the output. This measures
that on any machine, without a GPU: the decoded sheets (uint8 256x1600, as ``read_and_decode``
hands them over) are materialised in the object store first, then one actor takes them in model
batches and "runs the model" by sleeping ``--forward-ms`` per batch (a CUDA sync wait holds no CPU
and releases the GIL, as sleep does; 87 ms is resnet50 compiled at batch 256 on an H100). The
feed efficiency is the ideal time (batches x forward) over the stage's wall time: 1.0 means the
actor never waits on its input.

Settings, each in every round: ``--decode-batch`` (rows per decoded block) and ``--calls``
(``score.actor_calls``: Ray Data's ``max_concurrent_calls_per_actor``; with 2, fetching and
batching the next input overlaps the model call, which itself still runs one at a time).
"""

from __future__ import annotations

import argparse
import os
import platform
import time


import numpy as np  # noqa: E402


def decoded_block(batch: dict) -> dict:
    """What a decode task hands over: ids, sizes, an error column and the uint8 NHWC sheets."""
    n = len(batch["id"])
    rng = np.random.default_rng(int(batch["id"][0]))
    sheet = rng.integers(0, 256, (256, 1600, 1), dtype=np.uint8)
    return {"image_id": batch["id"].astype(str).astype(object), "height": np.full(n, 256, np.int32),
            "width": np.full(n, 1600, np.int32), "error": np.array([""] * n, dtype=object),
            "image_0": np.broadcast_to(sheet, (n, *sheet.shape)).copy()}


class FakeModel:
    """Stands for ``scoring.actor.Scorer`` on a GPU: takes the batch's images as one array, then waits."""

    def __init__(self, forward_s: float):
        self.forward_s = forward_s

    def __call__(self, batch: dict) -> dict:
        start = time.perf_counter()
        images = np.ascontiguousarray(batch["image_0"])  # as the actor hands it to torch
        time.sleep(self.forward_s)
        n = len(images)
        return {"image_id": batch["image_id"], "start": np.full(n, start), "end": np.full(n, time.perf_counter())}


def feed(ds, batch: int, calls: int, forward_s: float) -> tuple[float, float]:
    """(feed efficiency, mean wait between model calls in seconds) of one actor over the
    materialised dataset ``ds``, as ``scoring.job._pipeline`` sets its actor pool up."""
    import ray.data

    out = ds.map_batches(FakeModel, batch_size=batch, batch_format="numpy", fn_constructor_kwargs={"forward_s": forward_s},
                         compute=ray.data.ActorPoolStrategy(size=1, max_concurrent_calls_per_actor=calls,
                                                            enable_true_multi_threading=False),
                         num_cpus=1).select_columns(["start", "end"]).to_pandas()
    made = out.drop_duplicates(["start", "end"]).sort_values("start")
    assert len(out) == ds.count(), "rows lost or doubled"
    assert (made["start"].to_numpy()[1:] >= made["end"].to_numpy()[:-1]).all(), "model calls overlapped"
    # the actor's own span, first call to last return: leaves out the actor's start-up
    span = made["end"].max() - made["start"].min()
    return len(made) * forward_s / span, (span - len(made) * forward_s) / max(1, len(made) - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2048, help="decoded sheets")
    ap.add_argument("--batch", type=int, default=256, help="model batch size")
    ap.add_argument("--decode-batch", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--calls", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--forward-ms", type=float, default=87.0)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    import ray

    ray.init(num_cpus=2, include_dashboard=False,  # room for every materialised set, and the batches
             object_store_memory=(len(args.decode_batch) + 1) * args.n * 256 * 1600 + 2**30)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, ray {ray.__version__}, "
          f"{time.strftime('%Y-%m-%d')}; {args.n} sheets 256x1600 uint8, model batch {args.batch}, "
          f"forward {args.forward_ms:g} ms", flush=True)
    blocks = {}
    for d in args.decode_batch:
        ds = ray.data.range(args.n, override_num_blocks=max(1, args.n // d))
        blocks[d] = ds.map_batches(decoded_block, batch_size=d, batch_format="numpy").materialize()
    results: dict[tuple[int, int], list[tuple[float, float]]] = {}  # (efficiency, wait) per round
    for r in range(args.rounds):
        for d in args.decode_batch:
            for c in args.calls:
                eff, wait = feed(blocks[d], args.batch, c, args.forward_ms / 1000)
                results.setdefault((d, c), []).append((eff, wait))
                print(f" round {r + 1}: decode_batch {d:4d}, actor_calls {c}: feed efficiency {eff:.3f} "
                      f"(the model waited {wait * 1000:.1f} ms for each next batch)", flush=True)
    for (d, c), rs in results.items():
        print(f"decode_batch {d:4d}, actor_calls {c}: median of {len(rs)} rounds: feed efficiency "
              f"{np.median([e for e, _ in rs]):.3f}, wait {np.median([w for _, w in rs]) * 1000:.1f} ms a batch", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
