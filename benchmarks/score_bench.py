"""Scoring throughput and memory, side by side in one run on one machine.

    .ci/in-venv python benchmarks/score_bench.py [--n 600] [--rounds 1] [--model resnet18] [--size 128 800]
                                                 [--compile off on] [--batch 16 8] [--actor-calls 1 2]
                                                 [--bare-n 480]
                                                 [--mem-model mobilenetv3_small_050] [--mem-n 1000 5000]

1. Efficiency: the scoring job (``scoring.job.run``: Ray Data read/decode tasks -> model actor -> Parquet,
   wall time of the whole job, start-up and verification included) against the same model's bare
   forward pass over pre-decoded, pre-resized uint8 tensors (the ceiling), and against a naive loop
   that reads, decodes, resizes and predicts one image at a time (the notebook way). Same model,
   same torch thread count, same sheets. ``--compile on`` runs the job with ``score.compile=true``
   against a compiled bare model (its compile outside the timing; the job's inside it, in the
   actor); the naive loop stays eager, as a notebook runs it.
2. Memory: the scoring job over ``--mem-n`` sheets (a small model, so the data path dominates),
   peak machine memory in use above the idle baseline (MemTotal - MemAvailable, sampled every
   0.1 s; Ray's object store is shared memory and counted). Streaming should keep it roughly flat.

Sheets: synthetic Severstal 1600x256 JPEGs (``--unique`` of them, repeated under other names up to
the counts needed: same bytes, different URIs, so every one is really read and decoded).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import threading
import time

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from steelray import checkpoint, config, data, images, model_io, models, storage, synth  # noqa: E402
from steelray.scoring import job as scoring_job  # noqa: E402


def make_checkpoint(folder: str, name: str, size: tuple[int, int]) -> str:
    cfg = config.load(None, ["task=multilabel", f"model.name={name}", f"input.size=[{size[0]},{size[1]}]",
                             "data.format=severstal"])
    torch.manual_seed(0)
    model = models.build_model(cfg, 4)
    checkpoint.write(folder, model, checkpoint.make_meta(cfg, data.SEVERSTAL_CLASSES, models.preprocess_for(cfg)))
    return folder


def fill(folder: str, sources: list[str], n: int) -> None:
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        src = sources[i % len(sources)]
        os.link(src, os.path.join(folder, f"{i:06d}-{os.path.basename(src)}"))


def preprocess(blob: bytes, pre: model_io.Preprocess) -> np.ndarray:
    img = images.decode_image(blob, pre.in_chans)
    return cv2.resize(img, (pre.size[1], pre.size[0]), interpolation=cv2.INTER_LINEAR).reshape(*pre.size, -1)


def normalise(x: torch.Tensor, pre: model_io.Preprocess) -> torch.Tensor:
    x = x.permute(0, 3, 1, 2).float()
    mean = torch.tensor(pre.mean).view(1, -1, 1, 1) * 255
    std = torch.tensor(pre.std).view(1, -1, 1, 1) * 255
    return (x - mean) / std


def bare_forward(ckpt: str, images: list[np.ndarray], batch: int, threads: int, compile: bool = False) -> float:
    """Images/s of the model alone on tensors already decoded and resized (uint8 NHWC, as the actors get)."""
    torch.set_num_threads(threads)
    model, meta = checkpoint.load_model(ckpt)
    model = model.to(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model, dynamic=False)
        images = images[:len(images) // batch * batch]  # whole batches: one shape, one compile
    pre = model_io.Preprocess.from_dict(meta["preprocess"])
    stack = torch.from_numpy(np.stack(images))
    with torch.inference_mode():
        model(normalise(stack[:batch], pre))  # warm-up
        start = time.perf_counter()
        for i in range(0, len(stack), batch):
            model(normalise(stack[i:i + batch], pre)).sigmoid()
    return len(stack) / (time.perf_counter() - start)


def naive_loop(ckpt: str, uris: list[str], threads: int) -> float:
    """Read, decode, resize, predict, one image at a time."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    model, meta = checkpoint.load_model(ckpt)
    pre = model_io.Preprocess.from_dict(meta["preprocess"])
    with torch.inference_mode():
        for uri in uris:
            x = torch.from_numpy(preprocess(storage.read_bytes(uri), pre)[None])
            model(normalise(x, pre)).sigmoid()
    return len(uris) / (time.perf_counter() - start)


class PeakMemory:
    """Peak of (MemTotal - MemAvailable) while running, above the level at start."""

    def __init__(self):
        self.peak = self.base = self._used()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    @staticmethod
    def _used() -> int:
        info = dict(line.split(":", 1) for line in open("/proc/meminfo"))
        kib = lambda k: int(info[k].split()[0])  # noqa: E731
        return (kib("MemTotal") - kib("MemAvailable")) * 1024

    def _watch(self):
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self._used())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def above_base_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def run_job(inputs: str, ckpt: str, output: str, batch: int, threads: int, compile: bool = False,
            calls: int | None = None) -> scoring_job.Summary:
    shutil.rmtree(output, ignore_errors=True)
    job = config.load(None, [f"score.input={inputs}", f"score.checkpoint={ckpt}", f"score.output={output}",
                             f"score.batch_size={batch}", f"score.actor_threads={threads}", "score.actor_cpus=1",
                             "score.decode_batch=32", f"score.compile={str(compile).lower()}"]
                      + ([f"score.actor_calls={calls}"] if calls else []), config.ScoreJob)
    return scoring_job.run(job)


def steady_rate(output: str) -> float:
    """Images/s between the model's first and last batch, from the rows' ``scored_at`` (set when a
    batch leaves the model): the job without its start-up (Ray Data planning, actor start, torch
    import, checkpoint load) and its tail (the last write, read-back)."""
    import pyarrow.dataset as pds

    ts = pds.dataset(output, format="parquet", partitioning="hive").to_table(columns=["scored_at"]).column(
        "scored_at").to_numpy()
    first = ts.min()
    return float((ts != first).sum() / ((ts.max() - first) / np.timedelta64(1, "s")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=600, help="sheets for the efficiency comparison")
    ap.add_argument("--unique", type=int, default=200, help="distinct synthetic sheets generated")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, nargs=2, default=[128, 800], metavar=("H", "W"))
    ap.add_argument("--batch", type=int, nargs="+", default=[16], help="model batch sizes (each in every round)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads, for every contender")
    ap.add_argument("--naive-n", type=int, default=100, help="sheets for the (slow) naive loop")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of bare / job / naive, side by side")
    ap.add_argument("--compile", nargs="+", choices=["off", "on"], default=["off"],
                    help="score.compile for the job (and torch.compile for the bare model); several: each in every round")
    ap.add_argument("--actor-calls", type=int, nargs="+", default=[0],
                    help="score.actor_calls for the job (0: its default); several: each in every round")
    ap.add_argument("--bare-n", type=int, default=0, help="pre-decoded sheets for the bare model (0: --n)")
    ap.add_argument("--mem-model", default="mobilenetv3_small_050")
    ap.add_argument("--mem-size", type=int, nargs=2, default=[64, 400], metavar=("H", "W"))
    ap.add_argument("--mem-n", type=int, nargs="*", default=[1000, 5000])
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "steelray-score-bench"))
    args = ap.parse_args()

    import ray

    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    written = synth.make_severstal(os.path.join(work, "src"), args.unique, seed=11, workers=2)
    sources = sorted(os.path.join(written.images, f) for f in os.listdir(written.images))
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"ray {ray.__version__}, {time.strftime('%Y-%m-%d')}", flush=True)

    ckpt = make_checkpoint(os.path.join(work, "ckpt"), args.model, tuple(args.size))
    fill(os.path.join(work, "eff"), sources, args.n)
    pre = model_io.Preprocess.from_dict(checkpoint.read_meta(ckpt)["preprocess"])
    decoded = [preprocess(storage.read_bytes(sources[i % len(sources)]), pre) for i in range(args.n)]
    ray.init(num_cpus=2, include_dashboard=None, runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}})

    # Rounds of bare model, whole job, naive loop, side by side: this box's speed drifts by 10-20%
    # over minutes, so each round's job is divided by the bare model measured just before and after it.
    uris = sorted(os.path.join(work, "eff", f) for f in os.listdir(os.path.join(work, "eff")))
    print(f"efficiency: {args.model} {args.size[0]}x{args.size[1]}, batch {args.batch}, {args.threads} torch threads, "
          f"{args.n} sheets, {args.rounds} round(s)")
    settings = [(c, b, k) for c in args.compile for b in args.batch for k in args.actor_calls]  # each in every round
    ratios: dict[tuple[str, int, int], list[list[float]]] = {s: [] for s in settings}
    bare_images = decoded[:args.bare_n or args.n]
    for r in range(args.rounds):
        print(f" round {r + 1}:")
        rates = {}
        for c, b, k in settings:
            on = c == "on"
            bare_before = bare_forward(ckpt, bare_images, b, args.threads, on)
            summary = run_job(os.path.join(work, "eff"), ckpt, os.path.join(work, "out-eff"), b, args.threads, on, k)
            pipeline = summary.images_per_s
            steady = steady_rate(os.path.join(work, "out-eff"))
            bare_after = bare_forward(ckpt, bare_images, b, args.threads, on)
            bare = (bare_before + bare_after) / 2
            rates[c, b, k] = pipeline, steady
            print(f"  compile {c}, batch {b}, actor_calls {k or 'default'}:")
            print(f"   pipeline (job.run, whole job) {pipeline:8.1f} img/s  ({summary.seconds:.1f} s)")
            print(f"   pipeline, first to last batch   {steady:8.1f} img/s  -> steady/bare = {steady / bare:.2f}")
            print(f"   bare forward, pre-decoded       {bare:8.1f} img/s  (before the job {bare_before:.1f}, after "
                  f"{bare_after:.1f})  -> pipeline/bare = {pipeline / bare:.2f}", flush=True)
            ratios[c, b, k].append([pipeline / bare, steady / bare])
        # last in the round: first, it would run while the fresh Ray session starts its processes
        naive = naive_loop(ckpt, uris[:args.naive_n], args.threads)
        print(f"  naive one-at-a-time loop (eager) {naive:8.1f} img/s  -> pipeline/naive "
              + ", ".join(f"compile {c} batch {b} calls {k or 'default'}: {p / naive:.2f} (steady {st / naive:.2f})"
                          for (c, b, k), (p, st) in rates.items()), flush=True)
        for setting, (p, st) in rates.items():
            ratios[setting][-1] += [p / naive, st / naive]
    for (c, b, k), rs in ratios.items():
        if len(rs) > 1:
            med = np.median(np.array(rs), axis=0)
            print(f" compile {c}, batch {b}, actor_calls {k or 'default'}, median of {len(rs)} rounds: whole/bare {med[0]:.2f}, "
                  f"steady/bare {med[1]:.2f}, whole/naive {med[2]:.2f}, steady/naive {med[3]:.2f}", flush=True)

    mckpt = make_checkpoint(os.path.join(work, "mckpt"), args.mem_model, tuple(args.mem_size))
    print(f"memory: {args.mem_model} {args.mem_size[0]}x{args.mem_size[1]}, batch 32, full 1600x256 sheets decoded")
    for n in args.mem_n:
        folder = os.path.join(work, f"mem-{n}")
        fill(folder, sources, n)
        ray.shutdown()  # a fresh Ray per size, so each baseline is the same idle cluster
        ray.init(num_cpus=2, include_dashboard=None, runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}})
        time.sleep(5)
        with PeakMemory() as mem:
            s = run_job(folder, mckpt, os.path.join(work, f"out-mem-{n}"), 32, args.threads)
        print(f"  {n:6d} sheets: peak +{mem.above_base_mib:7.0f} MiB above idle, {s.images_per_s:6.1f} img/s, "
              f"{s.scored} scored, {s.errored} errors", flush=True)
        shutil.rmtree(folder)
    ray.shutdown()


if __name__ == "__main__":
    main()
