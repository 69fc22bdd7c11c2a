"""Time per 256x1600 mask for rle.encode and rle.decode (the vectorised numpy versions).

    python benchmarks/rle_bench.py [--repeat 200]

Masks: the real Severstal sample rows when ../shared/data is present, plus synthetic masks of each
class; for scale, the same masks through a plain per-run Python loop (the usual notebook decoder).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

from steelray import rle, synth  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "severstal-sample" / "train.csv"


def loop_decode(text: str, shape=(256, 1600)) -> np.ndarray:
    """The common notebook decoder: a Python loop over runs."""
    flat = np.zeros(shape[0] * shape[1], dtype=bool)
    tokens = text.split()
    for start, length in zip(tokens[0::2], tokens[1::2]):
        flat[int(start) - 1:int(start) - 1 + int(length)] = True
    return flat.reshape(shape, order="F")


def per_call(fn, items, repeat: int) -> float:
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(repeat):
            for x in items:
                fn(x)
        best = min(best, (time.perf_counter() - t) / (repeat * len(items)))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeat", type=int, default=50)
    args = p.parse_args()
    strings = []
    if REAL.exists():
        import pandas as pd

        strings += list(pd.read_csv(REAL)["EncodedPixels"])
    for c in range(4):
        freq = tuple(float(i == c) for i in range(4))
        for i in range(3):
            strings.append(rle.encode(synth.severstal_sheet(0, i, 0.0, freq, 0.0)[1][c]))
    masks = [rle.decode(s) for s in strings]
    runs = np.mean([len(s.split()) // 2 for s in strings])
    dec = per_call(rle.decode, strings, args.repeat)
    enc = per_call(rle.encode, masks, args.repeat)
    loop = per_call(loop_decode, strings, args.repeat)
    assert all(np.array_equal(loop_decode(s), m) for s, m in zip(strings, masks))
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}, "
          f"numpy {np.__version__}")
    print(f"masks: {len(strings)} ({'real sample + ' if REAL.exists() else ''}synthetic), 256x1600, "
          f"mean {runs:.0f} runs each")
    print(f"decode: {dec * 1e3:.3f} ms/mask   encode: {enc * 1e3:.3f} ms/mask   "
          f"python-loop decode: {loop * 1e3:.3f} ms/mask ({loop / dec:.1f}x decode)")


if __name__ == "__main__":
    main()
