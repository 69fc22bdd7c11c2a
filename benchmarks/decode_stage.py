"""CPU cost of the scoring job's first stage: decode in the tasks (``score.decode=tasks``) against
read-and-probe only (``score.decode=actor``, the actors decode), side by side, one process.

    .ci/in-venv python benchmarks/decode_stage.py [--rounds 5] [--batch 32]

Each contender is the stage function the pipeline runs (``score.read_and_decode`` with a 256x1600
one-channel model input, ``score.read_and_probe``) over the same files, in batches of ``--batch``,
the best of ``--rounds`` passes; images/s per CPU core, and the ratio. Sheets: the 10 real
Severstal sheets in ../shared/data/severstal-sample when present (real JPEG texture), and 64
synthetic ones; each set repeated under several names so that every file is really read.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from steelray import score, synth  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "severstal-sample" / "train_images"
INPUT = [{"size": [256, 1600], "crop": None, "in_chans": 1, "mean": [0.449], "std": [0.226]}]


def files(src: list[str], folder: str, n: int) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    out = []
    for i in range(n):
        path = os.path.join(folder, f"{i:05d}-{os.path.basename(src[i % len(src)])}")
        if not os.path.exists(path):
            os.link(src[i % len(src)], path)
        out.append(path)
    return out


def rate(stage, uris: list[str], batch: int, rounds: int, **kw) -> float:
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(0, len(uris), batch):
            chunk = np.array(uris[i:i + batch], dtype=object)
            out = stage({"image_id": chunk, "source_uri": chunk}, expect_size=(256, 1600), s3=None, retries=0,
                        threads=1, **kw)
            assert not any(out["error"]), out["error"]
        best = max(best, len(uris) / (time.perf_counter() - start))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="files per set")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "steelray-decode-stage"))
    args = ap.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}; "
          f"one process, batch {args.batch}, best of {args.rounds}")
    sets = {}
    if REAL.is_dir():
        sets["real Severstal (10 sheets)"] = sorted(str(p) for p in REAL.iterdir())
    else:
        print(f"({REAL} absent: synthetic sheets only)")
    made = synth.make_severstal(os.path.join(args.work, "synth"), 64, seed=5)
    sets["synthetic (64 sheets)"] = sorted(os.path.join(made.images, f) for f in os.listdir(made.images))
    for k, (name, src) in enumerate(sets.items()):
        uris = files(src, os.path.join(args.work, f"set{k}"), args.n)
        kib = np.mean([os.path.getsize(u) for u in src]) / 1024
        decode = rate(score.read_and_decode, uris, args.batch, args.rounds, inputs=INPUT)
        probe = rate(score.read_and_probe, uris, args.batch, args.rounds)
        print(f"{name}, {kib:.0f} KiB per JPEG: read+decode (score.decode=tasks) {decode:.0f} img/s per core; "
              f"read+probe (score.decode=actor) {probe:.0f} img/s per core; ratio {probe / decode:.1f}x")


if __name__ == "__main__":
    main()
