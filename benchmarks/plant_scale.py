"""A night at plant scale: what the scoring job's driver spends before the first sheet is decoded.

    .ci/in-venv python benchmarks/plant_scale.py [--inputs 10000 100000] [--nights 30] [--rows-per-file 1000]

On moto's S3 server on 127.0.0.1: ``--inputs`` sheets uploaded under tonight's prefix (tiny objects:
only their keys matter here), and an output that already holds ``--nights`` earlier nights of the same
size, two model versions (``done_set.build``). For each size, in a fresh process (peak memory is the
process's): the job's own steps up to the pipeline, timed one by one with the job's functions:
listing the inputs (``scoring.inputs.list_inputs``), opening the output and reading which inputs
this version already scored (``output.open_output`` + ``output.rows_for``), and the work list Ray Data
gets (``from_items`` rows). Once for tonight's new sheets, once as a rerun after tonight's rows
were written (all done). moto is a local stand-in: its listing and request costs are not AWS's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from done_set import FIRST_NIGHT, build, digest, moto, night_uris  # noqa: E402


def child(night: int, per_night: int) -> dict:
    """The driver's steps for one job whose inputs are ``night``'s sheets, in this process."""
    from steelray import config
    from steelray.scoring import output
    from steelray.scoring.inputs import list_inputs

    day = FIRST_NIGHT + dt.timedelta(days=night)
    sc = config.load(None, [f"score.input=s3://plant/incoming/{day}/", "score.output=s3://predictions/out"],
                     config.ScoreJob).score
    output.open_output(sc.output, None)  # imports and the S3 session: not part of the steps
    start_mib = peak()
    t0 = time.perf_counter()
    inputs = list_inputs(sc, None)
    t1 = time.perf_counter()
    list_mib = peak()
    dataset = output.open_output(sc.output, None)
    done = set(output.rows_for(dataset, sc.output, digest(0), [u for _, u in inputs], None)
               .column("source_uri").to_pylist())
    t2 = time.perf_counter()
    done_mib = peak()
    todo = [{"image_id": i, "source_uri": u} for i, u in inputs if u not in done]
    t3 = time.perf_counter()
    return {"inputs": len(inputs), "todo": len(todo), "list_s": t1 - t0, "done_s": t2 - t1, "todo_s": t3 - t2,
            "files": len(dataset.files) if dataset else 0, "start_mib": start_mib, "list_mib": list_mib,
            "done_mib": done_mib, "peak_mib": peak(), "held_mib": held()}


def child_listing(night: int, how: str) -> dict:
    """The listing alone, for the side-by-side rows: ``s3fs``, as the job listed before 2026-11-28
    (s3fs ``find``: a metadata dict per key, cached), or ``job``, as it lists now (``storage.list_files``)."""
    from steelray import storage

    prefix = f"s3://plant/incoming/{FIRST_NIGHT + dt.timedelta(days=night)}/"
    fs, path = storage.filesystem(prefix)
    fs.ls("plant")
    storage.pyarrow_filesystem(prefix)  # pyarrow's S3 start-up, outside the measurement
    before = held()
    start = peak()
    t = time.perf_counter()
    if how == "s3fs":
        uris = sorted(f"s3://{p}" for p in fs.find(path) if not p.endswith("/"))
    else:
        uris = storage.list_files(prefix)
    return {"inputs": len(uris), "list_s": time.perf_counter() - t, "start_mib": start, "peak_mib": peak(),
            "held_before_mib": before, "held_mib": held()}


def peak() -> float:
    """This process's peak resident memory so far, MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def held() -> float:
    """Resident memory now, after a garbage collection, MiB: what stays with the driver for the night."""
    import gc

    gc.collect()
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def upload(fs, night: int, count: int) -> float:
    """Tonight's ``count`` sheets as tiny objects (concurrent PUTs through s3fs); returns seconds."""
    t = time.perf_counter()
    uris = night_uris(night, count)
    for lo in range(0, count, 5000):
        fs.pipe({u: b"\xff\xd8" for u in uris[lo:lo + 5000]})
    return time.perf_counter() - t


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(int(sys.argv[2]), int(sys.argv[3]))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--child-listing":
        print(json.dumps(child_listing(int(sys.argv[2]), sys.argv[3])))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--inputs", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--nights", type=int, default=30, help="earlier nights already in the output")
    ap.add_argument("--rows-per-file", type=int, default=1000)
    ap.add_argument("--listing-only", action="store_true", help="only the two listings, side by side")
    args = ap.parse_args()
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print("command:", " ".join([Path(sys.executable).name] + sys.argv))
    print("| inputs a night | output files | job | list inputs s | done-set s | work list s | to score | "
          "peak MiB: start / listed / done-set / work list | held after |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.inputs:
            proc, endpoint = moto(tmp)  # a fresh server per size: moto's memory is not the driver's
            try:
                env = dict(os.environ, AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing",
                           AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
                os.environ.update(env)
                import s3fs

                fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
                fs.mkdir("predictions")
                fs.mkdir("plant")
                t = time.perf_counter()
                if not args.listing_only:
                    build("s3://predictions/out", args.nights, n, args.rows_per_file, 2)
                built = time.perf_counter() - t
                up = upload(fs, args.nights, n)
                print(f"<!-- {n}: output built in {built:.0f} s, inputs uploaded in {up:.0f} s -->", flush=True)
                for how, label in (("s3fs", "s3fs find (the job before 2026-11-28)"),
                                   ("job", "storage.list_files (the job now)")) * (2 if args.listing_only else 1):
                    out = subprocess.run([sys.executable, __file__, "--child-listing", str(args.nights), how],
                                         capture_output=True, text=True, env=env, check=True)
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    print(f"| {n:,} | | listing alone, {label} | {r['list_s']:.2f} | | | | "
                          f"{r['start_mib']:.0f} / {r['peak_mib']:.0f} | {r['held_before_mib']:.0f} -> "
                          f"{r['held_mib']:.0f} |", flush=True)
                if args.listing_only:
                    continue
                for label in ("tonight's new sheets", "a rerun of tonight (all done)"):
                    if label.startswith("a rerun"):  # tonight's rows, as the first job wrote them
                        build("s3://predictions/out", args.nights + 1, n, args.rows_per_file, 2, first=args.nights)
                    out = subprocess.run([sys.executable, __file__, "--child", str(args.nights), str(n)],
                                         capture_output=True, text=True, env=env, check=True)
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    print(f"| {n:,} | {r['files']:,} | {label} | {r['list_s']:.2f} | {r['done_s']:.2f} | "
                          f"{r['todo_s']:.2f} | {r['todo']:,} | {r['start_mib']:.0f} / {r['list_mib']:.0f} / "
                          f"{r['done_mib']:.0f} / {r['peak_mib']:.0f} | {r['held_mib']:.0f} |",
                          flush=True)
            finally:
                proc.terminate()
                proc.wait(10)


if __name__ == "__main__":
    main()
