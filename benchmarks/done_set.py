"""What a scoring job reads of an output that has grown for a year: side by side in one run.

    .ci/in-venv python benchmarks/done_set.py [--nights 365] [--per-night 10000] [--rows-per-file 1000]
                                              [--versions 2] [--s3-nights 30] [--root DIR]

Before it scores, a job asks the output which of its inputs this model version already scored; after
it wrote, it reads the output back to check that each input is there exactly once. Both read the
``source_uri`` of earlier rows, and a nightly output only grows: 10,000 sheets a night are 3.65
million rows a year. This builds such an output (a 4-class classifier's columns, ``--versions`` model
versions each scoring every night, files of ``--rows-per-file`` rows as ``ParquetSink`` writes them)
and times, each in a fresh process (peak memory is the process's), a job whose inputs are tonight's
new sheets and one whose inputs are all scored already (a rerun), two ways:

- ``before``: how the job read until 2026-11-23 (``before()`` below): every file opened, every row
  of its version held, a Python set;
- ``now``: ``scoring.output.rows_for(..., inputs)``: files named for other versions are not opened, and
  rows are matched to the inputs while they are read.

``--s3-nights`` repeats it, smaller, on moto's S3 server on 127.0.0.1 (a local stand-in: it shows the
per-file cost of S3 requests, not AWS's latency).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

CLASSES = ("1", "2", "3", "4")
FIRST_NIGHT = dt.date(2026, 1, 1)


def digest(v: int) -> str:
    return hashlib.sha256(f"version {v}".encode()).hexdigest()[:16]


def night_uris(n: int, count: int) -> list[str]:
    day = FIRST_NIGHT + dt.timedelta(days=n)
    return [f"s3://plant/incoming/{day}/line-2/sheet-{day:%Y%m%d}-{i:06d}.jpg" for i in range(count)]


def build(root: str, nights: int, per_night: int, per_file: int, versions: int, first: int = 0) -> int:
    """The output of nightly jobs ``first`` to ``nights - 1`` of each version; returns its number of files."""
    from steelray import input_stats, storage
    from steelray.scoring.plan import ModelInfo, Plan

    fs, base = storage.filesystem(root)
    rng = np.random.default_rng(0)
    files = 0
    for v in range(versions):
        info = ModelInfo(uri="", task="multilabel", classes=CLASSES, thresholds=(0.5,) * 4,
                               preprocess=None, name="resnet50", digest=digest(v), data_format="severstal")
        schema = Plan(info, None, None, ()).schema()
        for n in range(first, nights):
            uris = night_uris(n, per_night)
            when = dt.datetime.combine(FIRST_NIGHT + dt.timedelta(days=n), dt.time(2), dt.timezone.utc)
            for lo in range(0, per_night, per_file):
                chunk = uris[lo:lo + per_file]
                k = len(chunk)
                probs = rng.random((k, len(CLASSES)), dtype=np.float32)
                cols = {"image_id": [u.rsplit("/", 1)[-1] for u in chunk], "source_uri": chunk,
                        "model": ["resnet50"] * k, "checkpoint": [info.digest] * k, "scored_at": [when] * k,
                        "height": [256] * k, "width": [1600] * k}
                cols.update({f"prob_{c}": probs[:, j] for j, c in enumerate(CLASSES)})
                cols["labels"] = [[c for j, c in enumerate(CLASSES) if p[j] > 0.5] for p in probs]
                cols["any_defect"] = (probs > 0.5).any(axis=1)
                cols["error"] = [None] * k
                for name, value in zip(input_stats.STATS, rng.random((len(input_stats.STATS), k), dtype=np.float32)):
                    cols[name] = value
                table = pa.Table.from_pydict(cols, schema=schema)
                tag = hashlib.sha1("\n".join([info.digest] + chunk).encode()).hexdigest()[:16]
                path = f"{base}/run_date={FIRST_NIGHT + dt.timedelta(days=n)}/part-{info.digest}-{tag}.parquet"
                fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
                with fs.open(path, "wb") as f:
                    pq.write_table(table, f, compression="zstd")
                files += 1
    return files


def before(root: str, version: str) -> pa.Table:
    """What a job read until 2026-11-23 (commit ff8d96b): every row of its version."""
    import pyarrow.compute as pc

    from steelray.scoring.output import open_output

    dataset = open_output(root, None)
    return dataset.to_table(columns=["source_uri", "error"], filter=pc.field("checkpoint") == version)


def measure(root: str, method: str, night: int, per_night: int) -> dict:
    """One job's two reads (what is done; the check after writing), in this process."""
    import resource

    import pyarrow.compute as pc

    from steelray.scoring.output import open_output, rows_for

    inputs = night_uris(night, per_night)
    open_output(root, None)  # imports and S3 session set-up: not part of either method
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if method == "before":
        done = set(before(root, digest(0)).column("source_uri").to_pylist())
    else:
        done = set(rows_for(open_output(root, None), root, digest(0), inputs, None).column("source_uri").to_pylist())
    todo = [u for u in inputs if u not in done]
    t1 = time.perf_counter()
    wanted = set(inputs)
    if method == "before":
        rows = before(root, digest(0))
    else:
        rows = rows_for(open_output(root, None), root, digest(0), inputs, None)
    counts = pc.value_counts(rows.column("source_uri")).to_pylist() if rows.num_rows else []
    found = {c["values"] for c in counts if c["values"] in wanted}
    t2 = time.perf_counter()
    return {"todo": len(todo), "found": len(found), "done_s": t1 - t0, "verify_s": t2 - t1,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "start_mib": rss0 / 1024}


def run_child(root: str, method: str, night: int, per_night: int, env: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", root, method, str(night), str(per_night)],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def moto(tmp: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(os.path.join(tmp, "moto.log"), "w"), stderr=subprocess.STDOUT)
    for _ in range(150):
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            return proc, endpoint
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto server did not start")


def table(root: str, nights: int, per_night: int, files: int, versions: int, env: dict) -> None:
    print(f"\noutput {root}: {nights} nights x {per_night:,} sheets x {versions} version(s), {files:,} files; "
          f"version 0's rows: {nights * per_night:,}")
    print("| job's inputs | method | to score | found at the check | done-set read s | check read s | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for label, night in (("tonight's new sheets", nights), ("a rerun of the last night", nights - 1)):
        for method in ("before", "now"):
            r = run_child(root, method, night, per_night, env)
            print(f"| {label} | {method} | {r['todo']:,} | {r['found']:,} | {r['done_s']:.2f} | "
                  f"{r['verify_s']:.2f} | {r['peak_mib']:.0f} (start {r['start_mib']:.0f}) |", flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        root, method, night, per_night = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        print(json.dumps(measure(root, method, night, per_night)))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nights", type=int, default=365)
    ap.add_argument("--per-night", type=int, default=10000)
    ap.add_argument("--rows-per-file", type=int, default=1000)
    ap.add_argument("--versions", type=int, default=2)
    ap.add_argument("--s3-nights", type=int, default=30, help="0: no S3 run")
    ap.add_argument("--root", default="", help="local folder for the output (default: a temporary one)")
    args = ap.parse_args()
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"pyarrow {pa.__version__}; {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print("command:", " ".join([Path(sys.executable).name] + sys.argv))
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or os.path.join(tmp, "out")
        t = time.perf_counter()
        files = build(root, args.nights, args.per_night, args.rows_per_file, args.versions)
        print(f"built in {time.perf_counter() - t:.0f} s")
        table(root, args.nights, args.per_night, files, args.versions, dict(os.environ))
        if args.s3_nights:
            proc, endpoint = moto(tmp)
            try:
                env = dict(os.environ, AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing",
                           AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
                os.environ.update(env)
                import s3fs

                s3fs.S3FileSystem(endpoint_url=endpoint).mkdir("predictions")
                files = build("s3://predictions/out", args.s3_nights, args.per_night, args.rows_per_file, args.versions)
                table("s3://predictions/out", args.s3_nights, args.per_night, files, args.versions, env)
            finally:
                proc.terminate()
                proc.wait(10)


if __name__ == "__main__":
    main()
