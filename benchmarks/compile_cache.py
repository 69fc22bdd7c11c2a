"""What ``score.compile_cache`` saves: a model actor's compile on a fresh node, with and without it.

    .ci/in-venv python benchmarks/compile_cache.py                     # CPU: resnet18 at 128x800, batch 16
    python3 benchmarks/compile_cache.py --device cuda --model resnet50 --size 256 1600 --batch 256 \\
        --precision bf16                                               # one GPU

Why: a compiled model scores faster (docs/benchmarks.md) but every actor compiles on its first
batch, and nightly clusters start fresh nodes, so every night pays the whole compile. Each figure
comes from a fresh Python process with its own empty inductor cache (a fresh node), running
``scoring.actor.Scorer`` as an actor does: the first call's time (imports excluded; the compile
happens there) and the steady rate after it. Per round, three processes:

- cold: no cache; the process compiles and writes ``score.compile_cache``;
- from the file: a fresh inductor cache and the file the cold process wrote;
- local: the cold process's own inductor cache again, no file (what a node that already compiled
  once sees: the best case).

Random weights and uint8 inputs (speed does not depend on them).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


def child(args) -> None:
    """One fresh process: build the actor, time its first call and its steady rate; print JSON."""
    import numpy as np

    from steelray import config
    from steelray.scoring.actor import ActorSettings, Scorer
    from steelray.scoring.plan import make_plan

    plan = make_plan(config.load(None, [f"score.checkpoint={args.ckpt}"], config.ScoreJob).score, None)
    scorer = Scorer(plan, ActorSettings(args.device, args.threads, args.precision, compile=True, batch=args.batch,
                                        compile_cache=args.cache))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch, *args.size, 1), dtype=np.uint8)
    model = scorer.models[plan.models[0].uri]

    def call():
        out = model.probabilities(images)
        if args.device == "cuda":
            model.torch.cuda.synchronize()
        return out

    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    call()
    start = time.perf_counter()
    for _ in range(args.calls):
        call()
    rate = args.calls * args.batch / (time.perf_counter() - start)
    print(json.dumps({"first_call_s": first, "images_per_s": rate}))


def measure(args, inductor_dir: str, cache: str, ckpt: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--ckpt", ckpt, "--cache", cache,
           "--device", args.device, "--batch", str(args.batch), "--size", *map(str, args.size),
           "--precision", args.precision, "--threads", str(args.threads), "--calls", str(args.calls)]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": inductor_dir}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if run.returncode:
        raise SystemExit(run.stderr[-3000:])
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, nargs=2, default=[128, 800])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16-mixed", "bf16"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the actor (0: torch's default)")
    ap.add_argument("--calls", type=int, default=8, help="calls timed for the steady rate")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    import platform

    import torch

    from steelray import checkpoint, config, data, models

    work = tempfile.mkdtemp(prefix="steelray-compile-cache-")
    ckpt = os.path.join(work, "ckpt")
    cfg = config.load(None, ["task=multilabel", f"model.name={args.model}", f"input.size=[{args.size[0]},{args.size[1]}]",
                             "data.format=severstal"])
    checkpoint.write(ckpt, models.build_model(cfg, 4),
                     checkpoint.make_meta(cfg, data.SEVERSTAL_CLASSES, models.preprocess_for(cfg)))
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.machine()}, {os.cpu_count()} CPUs"
    print(f"# {args.model} {args.size[0]}x{args.size[1]} batch {args.batch} {args.precision} on {where}, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}", flush=True)
    print("| round | process | first call (s) | images/s after |\n|---|---|---|---|")
    try:
        for r in range(1, args.rounds + 1):
            cache, cold_dir = os.path.join(work, f"cache-{r}"), os.path.join(work, f"inductor-{r}")
            for label, inductor_dir, folder in (("cold (writes the cache)", cold_dir, cache),
                                                ("fresh node, from the cache", os.path.join(work, f"fresh-{r}"), cache),
                                                ("same node again, no cache", cold_dir, "")):
                m = measure(args, inductor_dir, folder, ckpt)
                print(f"| {r} | {label} | {m['first_call_s']:.1f} | {m['images_per_s']:.1f} |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
