"""What the input statistics cost the decode stage, side by side in one run.

    .ci/in-venv python benchmarks/input_stats_cost.py [--sheets 64] [--rounds 5] [--batch 16]

The decode stage's own function (``scoring.decode.read_and_decode``: read, decode, check, measure,
resize) over synthetic 1600x256 JPEG sheets on local disk, in rounds alternating the stage as it is
and the same stage with ``input_stats.sheet_stats`` replaced by a function returning zeros. One
process, one thread (a decode task is one process); the model input is 128x800 grey.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

from steelray import input_stats, synth
from steelray.scoring import decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sheets", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print("command:", " ".join([os.path.basename(sys.executable)] + sys.argv))
    folder = tempfile.mkdtemp()
    written = synth.make_severstal(folder, args.sheets, seed=5, workers=1)
    uris = sorted(os.path.join(written.images, n) for n in os.listdir(written.images))
    inputs = [{"size": [128, 800], "crop": None, "in_chans": 1, "mean": [0.5], "std": [0.25], "normalize": "dataset"}]
    real = input_stats.sheet_stats
    zeros = np.zeros(len(input_stats.STATS), np.float32)

    def run() -> float:
        t = time.perf_counter()
        for lo in range(0, len(uris), args.batch):
            chunk = uris[lo:lo + args.batch]
            out = decode.read_and_decode({"image_id": chunk, "source_uri": chunk}, inputs=inputs,
                                         expect_size=(256, 1600), s3=None, retries=0, threads=1)
            assert not any(out["error"]), out["error"]
        return (time.perf_counter() - t) / len(uris) * 1e3

    times: dict[str, list[float]] = {"with statistics": [], "without": []}
    run()  # warm: file cache, imports
    for _ in range(args.rounds):
        for label in times:
            input_stats.sheet_stats = real if label == "with statistics" else (lambda image: zeros)
            times[label].append(run())
    input_stats.sheet_stats = real
    with_, without = statistics.median(times["with statistics"]), statistics.median(times["without"])
    print("| decode stage | ms a sheet, median of rounds | rounds |")
    print("|---|---|---|")
    for label, ts in times.items():
        print(f"| {label} | {statistics.median(ts):.2f} | {', '.join(f'{t:.2f}' for t in ts)} |")
    print(f"statistics add {with_ - without:.2f} ms a sheet, {100 * (with_ / without - 1):.1f}% of the decode stage")


if __name__ == "__main__":
    main()
