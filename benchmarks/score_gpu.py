"""GPU scoring figures: resnet50 on full 256x1600 sheets in bf16, and JPEG decode alone.

    python benchmarks/score_gpu.py [--batch 64 128] [--workers 15] [--precision bf16-mixed bf16]
                                   [--pipeline] [--actor-gpus 1 0.5] [--actor-calls 1 2]

Measured with the scoring job's own pieces, side by side in one run:
- decode: ``scoring.decode.read_and_decode`` (read + decode + size check, the pipeline's CPU stage) over
  ``--workers`` processes, images/s; and PIL decode alone in one process;
- model: ``scoring.actor.Scorer`` (the actor class: uint8 -> GPU, normalise, channels_last forward in each
  ``--precision`` (``score.precision``: bf16 autocast, or weights and inputs in bf16), per-class
  thresholds, output rows) on batches already decoded, images/s; and the bare forward pass on the
  same tensors already on the GPU (the ceiling); cuDNN autotuning is on, as in the actor;
- ``--naive N``: the notebook way on the GPU, one sheet read, decoded and predicted at a time;
- ``--pipeline``: the whole job, ``scoring.job.run`` on a local Ray (needs Ray installed), for each
  precision, each ``--actor-gpus`` (``score.actor_gpus``: 0.5 runs two actors per GPU) and each
  ``--actor-calls``
  (``score.actor_calls``: batches an actor holds at once, so the next is fetched during the model call).

Sheets are synthetic Severstal 1600x256 JPEGs (``--unique`` distinct, repeated up to ``--n``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from multiprocessing import Pool

import numpy as np  # noqa: E402
import torch  # noqa: E402

from steelray import checkpoint, config, data, images, input_stats, models, synth  # noqa: E402
from steelray.scoring import job as scoring_job  # noqa: E402
from steelray.scoring.actor import ActorSettings, Scorer  # noqa: E402
from steelray.scoring.decode import read_and_decode  # noqa: E402
from steelray.scoring.plan import make_plan  # noqa: E402

INPUT = [{"size": [256, 1600], "crop": None, "in_chans": 1, "mean": [0.449], "std": [0.226]}]


def _decode_chunk(uris: list[str]) -> int:
    out = read_and_decode({"image_id": np.array(uris, dtype=object), "source_uri": np.array(uris, dtype=object)},
                                inputs=INPUT, expect_size=(256, 1600), s3=None, retries=0, threads=4)
    assert not any(out["error"]), out["error"]
    return len(uris)


def decode_rate(uris: list[str], workers: int, chunk: int = 64) -> float:
    chunks = [uris[i:i + chunk] for i in range(0, len(uris), chunk)]
    with Pool(workers) as pool:
        pool.map(_decode_chunk, chunks[:workers])  # warm the workers
        start = time.perf_counter()
        done = sum(pool.map(_decode_chunk, chunks))
    return done / (time.perf_counter() - start)


def make_checkpoint(folder: str, name: str) -> str:
    cfg = config.load(None, ["task=multilabel", f"model.name={name}", "input.size=[256,1600]", "data.format=severstal"])
    model = models.build_model(cfg, 4)
    checkpoint.write(folder, model, checkpoint.make_meta(cfg, data.SEVERSTAL_CLASSES, models.preprocess_for(cfg)))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--unique", type=int, default=256)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batch", type=int, nargs="*", default=[64, 128])
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--precision", nargs="*", default=["bf16-mixed"], choices=["bf16-mixed", "bf16", "fp32"])
    ap.add_argument("--pipeline", action="store_true")
    ap.add_argument("--actor-gpus", type=float, nargs="*", default=[1.0], help="GPU share per model actor")
    ap.add_argument("--actor-calls", type=int, nargs="*", default=[4], help="score.actor_calls")
    ap.add_argument("--decode-batch", type=int, default=64, help="score.decode_batch in the pipeline runs")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd forward passes")
    ap.add_argument("--compile-modes", nargs="*", default=["default", "freezing"],
                    choices=["default", "freezing", "max-autotune"],
                    help="which compiled forward passes to time with --compile (max-autotune compiles for minutes)")
    ap.add_argument("--pipeline-compile", nargs="*", choices=["off", "on"], default=None,
                    help="score.compile in the pipeline runs (default: off, and on too with --compile)")
    ap.add_argument("--compile-cache", default="",
                    help="score.compile_cache in the pipeline runs (a folder; list a count twice in --pipeline-n "
                         "so that the second run loads what the first compiled)")
    ap.add_argument("--naive", type=int, default=0, metavar="N",
                    help="also time the naive loop on N sheets: read, decode, predict one at a time on the GPU")
    ap.add_argument("--only-pipeline", action="store_true", help="skip the decode and model-alone figures")
    ap.add_argument("--pipeline-n", type=int, nargs="*", default=[],
                    help="pipeline input counts; two or more give the marginal (steady-state) rate")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "steelray-score-gpu"))
    args = ap.parse_args()
    assert torch.cuda.is_available(), "no GPU"
    print(f"# {torch.cuda.get_device_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}", flush=True)

    shutil.rmtree(args.work, ignore_errors=True)
    t = time.perf_counter()
    written = synth.make_severstal(os.path.join(args.work, "src"), args.unique, seed=5, workers=args.workers)
    src = sorted(os.path.join(written.images, f) for f in os.listdir(written.images))
    inputs = os.path.join(args.work, "in")
    os.makedirs(inputs)
    for i in range(args.n):
        os.link(src[i % len(src)], os.path.join(inputs, f"{i:06d}-{os.path.basename(src[i % len(src)])}"))
    uris = sorted(os.path.join(inputs, f) for f in os.listdir(inputs))
    print(f"generated {args.unique} sheets, {args.n} inputs in {time.perf_counter() - t:.1f}s", flush=True)

    ckpt = make_checkpoint(os.path.join(args.work, "ckpt"), args.model)
    if args.only_pipeline:
        return pipeline(args, src, ckpt)
    start = time.perf_counter()
    for u in uris[:500]:
        images.decode_image(open(u, "rb").read(), 1, u)
    print(f"decode: PIL, 1 process: {500 / (time.perf_counter() - start):.0f} img/s", flush=True)
    print(f"decode: read_and_decode, {args.workers} processes: {decode_rate(uris, args.workers):.0f} img/s",
          flush=True)

    plan = make_plan(config.load(None, [f"score.checkpoint={ckpt}"], config.ScoreJob).score, None)
    sheets = np.stack([images.decode_image(open(u, "rb").read(), 1) for u in src])  # (unique, 256, 1600, 1)
    for precision, batch in ((p, b) for p in args.precision for b in args.batch):
        scorer = Scorer(plan, ActorSettings("cuda", precision=precision))
        runner = scorer.models[ckpt]
        model = runner.module
        reps = max(1, args.n // batch)
        idx = [np.arange(i * batch, (i + 1) * batch) % len(sheets) for i in range(reps)]
        gpu = torch.from_numpy(sheets[idx[0]]).cuda()
        x = ((gpu.permute(0, 3, 1, 2).float() / 255 - 0.449) / 0.226).contiguous(memory_format=torch.channels_last)
        x = x.to(runner.dtype)
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=runner.autocast):
            for _ in range(3):
                model(x)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(reps):
                model(x)
            torch.cuda.synchronize()
        bare = reps * batch / (time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() / 2**30  # what a GPU needs for this batch (score.batch_size)
        batches = [{"image_id": np.array([str(j) for j in i], dtype=object),
                    "source_uri": np.array([str(j) for j in i], dtype=object),
                    "height": np.full(batch, 256, np.int32), "width": np.full(batch, 1600, np.int32),
                    "error": np.array([""] * batch, dtype=object), "image_0": sheets[i],
                    "input_stats": np.zeros((batch, len(input_stats.STATS)), np.float32)} for i in idx]
        scorer(batches[0])
        torch.cuda.synchronize()
        start = time.perf_counter()
        rows = sum(scorer(b).num_rows for b in batches)
        torch.cuda.synchronize()
        actor = rows / (time.perf_counter() - start)
        print(f"{args.model} 256x1600 {precision} batch {batch}: bare forward (tensors on GPU) {bare:.0f} img/s, "
              f"peak GPU memory {peak:.1f} GiB; Scorer actor call (uint8 host batch -> rows) {actor:.0f} img/s",
              flush=True)
    if args.naive:  # the notebook way, on the GPU: one sheet at a time, bf16 autocast, no Ray
        model = scorer.models[ckpt].module
        start = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
            for u in uris[:args.naive]:
                img = torch.from_numpy(images.decode_image(open(u, "rb").read(), 1)).cuda()
                x = ((img.permute(2, 0, 1)[None].float() / 255 - 0.449) / 0.226).contiguous(
                    memory_format=torch.channels_last).to(runner.dtype)
                model(x).sigmoid().cpu()
        print(f"naive loop (read, decode, predict one at a time): "
              f"{args.naive / (time.perf_counter() - start):.0f} img/s", flush=True)

    if args.compile:
        import torch._inductor.config as inductor

        batch = args.batch[-1]
        x = torch.from_numpy(sheets[:batch] if len(sheets) >= batch else np.resize(sheets, (batch, *sheets.shape[1:])))
        x = ((x.cuda().permute(0, 3, 1, 2).float() / 255 - 0.449) / 0.226).contiguous(memory_format=torch.channels_last)
        x = x.to(runner.dtype)  # the last --precision's model
        modes = {"default": ("compile", False, None), "freezing": ("compile+freezing", True, None),
                 "max-autotune": ("compile+freezing max-autotune-no-cudagraphs", True, "max-autotune-no-cudagraphs")}
        for label, freezing, mode in (modes[m] for m in args.compile_modes):
            inductor.freezing = freezing
            torch._dynamo.reset()
            compiled = torch.compile(model, mode=mode)
            start = time.perf_counter()
            with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=runner.autocast):
                compiled(x)
                torch.cuda.synchronize()
                warm = time.perf_counter() - start
                for _ in range(2):
                    compiled(x)
                torch.cuda.synchronize()
                start = time.perf_counter()
                reps = max(1, args.n // batch)
                for _ in range(reps):
                    compiled(x)
                torch.cuda.synchronize()
            print(f"{args.model} 256x1600 {precision} batch {batch}: {label}: {reps * batch / (time.perf_counter() - start):.0f} "
                  f"img/s (first call {warm:.0f}s)", flush=True)

    if args.pipeline:
        pipeline(args, src, ckpt)


def pipeline(args, src: list[str], ckpt: str) -> None:
    """The whole job on a local Ray; with several input counts, also the marginal rate between the
    last two (start-up, actor start and model load cancel out; list a count twice to run once with a
    cold and once with a warm torch.compile cache)."""
    import itertools

    import ray

    ray.init(include_dashboard=False)
    counts = args.pipeline_n or [args.n]
    for compile_, precision, share, batch, calls in itertools.product(
            [c == "on" for c in args.pipeline_compile or (["off", "on"] if args.compile else ["off"])], args.precision,
            args.actor_gpus, args.batch, args.actor_calls):
        label = f"batch {batch} compile {compile_} {precision} actor_gpus {share} actor_calls {calls}"
        timed = []
        for k, n in enumerate(counts):
            folder = os.path.join(args.work, f"p-{n}")
            if not os.path.isdir(folder):
                os.makedirs(folder)
                for i in range(n):
                    os.link(src[i % len(src)], os.path.join(folder, f"{i:06d}-{os.path.basename(src[i % len(src)])}"))
            out = os.path.join(args.work, f"out-{k}-{n}-{batch}-{compile_}-{precision}-{share}-{calls}")
            job = config.load(None, [f"score.input={folder}", f"score.checkpoint={ckpt}", f"score.output={out}",
                                     f"score.batch_size={batch}", "score.actor_cpus=1",
                                     f"score.decode_batch={args.decode_batch}", f"score.actor_calls={calls}",
                                     f"score.compile={str(compile_).lower()}", f"score.precision={precision}",
                                     f"score.actor_gpus={share}", f"score.compile_cache={args.compile_cache}"], config.ScoreJob)
            s = scoring_job.run(job)
            timed.append((n, s.seconds))
            print(f"pipeline job.run {label}: {s.images_per_s:.0f} img/s over {s.scored} sheets "
                  f"({s.seconds:.1f}s, start-up included)", flush=True)
        if len(timed) > 1:
            (n0, t0), (n1, t1) = timed[-2], timed[-1]
            print(f"pipeline {label}: marginal {(n1 - n0) / (t1 - t0):.0f} img/s ({n0} -> {n1} sheets)", flush=True)


if __name__ == "__main__":
    main()
