"""A week of nights for the morning report: the example page in docs/, and what the report costs.

    .ci/in-venv python benchmarks/night_week.py example [--per-night 60] [--out docs/night_report_example]
    .ci/in-venv python benchmarks/night_week.py cost [--per-night 10000] [--nights 7]

``example``: two small classifiers trained briefly from scratch on synthetic sheets (production, and a
candidate trained longer), production evaluated (so its checkpoint keeps its validation probabilities,
the drift reference); seven nights of new synthetic sheets scored by both into one output, the last
night with glare (evaluate's "glare" condition) on two thirds of its sheets and two truncated files;
then the report of that night, production against the candidate, written to ``--out``.

``cost``: an output of ``--nights`` nights before tonight plus tonight, ``--per-night`` rows each, for
two model versions (``done_set.build``: a 4-class classifier's columns), and the report of tonight
with the candidate compared, timed in this process (gallery off: its few image reads depend on where
the sheets are, not on the night's size).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parents[1]


def example(per_night: int, out: str, work: str) -> None:
    from steelray import conditions, config, evaluate, images, night_page, night_report, synth, train
    from steelray.scoring import job

    data = synth.make_severstal(os.path.join(work, "train"), 240, seed=1)
    ckpts = {}
    for name, epochs in (("production", 4), ("candidate", 8)):
        cfg = config.load(str(REPO / "jobs/configs/severstal_multilabel.yaml"), [
            f"data.root={data.root}", "model.name=simple_cnn", "input.size=[64,400]", "input.crop=[]",
            "train.batch_size=16", "train.lr=2e-3", f"train.epochs={epochs}", "train.warmup_epochs=0",
            "train.loader_workers=0", "ray.use_gpu=false", f"ray.storage_path={work}/runs", f"ray.run_name={name}"])
        ckpts[name] = train.fit(cfg).best_checkpoint
        print(f"trained {name}: {ckpts[name]}", flush=True)
    ev = evaluate.run(config.load(None, [f"evaluate.checkpoint={ckpts['production']}", "evaluate.robustness=false"],
                                  config.EvaluateJob))
    print("reference kept:", evaluate.keep_reference(ev), flush=True)
    output = os.path.join(work, "predictions")
    first = dt.date(2026, 11, 21)
    for k in range(7):
        night = (first + dt.timedelta(days=k)).isoformat()
        sheets = synth.make_severstal(os.path.join(work, night), per_night, seed=100 + k)
        if k == 6:  # glare on two thirds of the last night's sheets, and two files cut short
            names = sorted(os.listdir(sheets.images))
            for name in names[: 2 * per_night // 3]:
                path = os.path.join(sheets.images, name)
                image = images.decode_image(Path(path).read_bytes(), 1)
                Path(path).write_bytes(synth.jpeg_bytes(conditions.perturb_image(image, "glare")[:, :, 0]))
            for name in names[-2:]:
                path = os.path.join(sheets.images, name)
                Path(path).write_bytes(Path(path).read_bytes()[:4000])
        for name in ("production", "candidate"):
            summary = job.run(config.load(None, [f"score.input={sheets.images}", f"score.checkpoint={ckpts[name]}",
                                                 f"score.output={output}", f"score.run_date={night}"], config.ScoreJob))
            print(f"{night} {name}: {summary.lines()[0]}", flush=True)
    rjob = config.load(None, [f"report.output={output}", f"report.checkpoint={ckpts['production']}",
                              f"report.candidate={ckpts['candidate']}", "report.gallery=3", f"report.out={out}"],
                       config.NightReportJob)
    t = time.perf_counter()
    night = night_report.build(rjob)
    written = night_page.write(night, rjob)
    print(f"report in {time.perf_counter() - t:.1f} s; alerts:", *night.summary["alerts"], sep="\n  ")
    print(*written.values(), sep="\n")


def cost(per_night: int, nights: int, work: str) -> None:
    import resource

    from done_set import FIRST_NIGHT, build, digest

    from steelray import config, night_page, night_report

    root = os.path.join(work, "out")
    t = time.perf_counter()
    files = build(root, nights + 1, per_night, 1000, 2)
    print(f"<!-- output: {nights + 1} nights x {per_night:,} rows x 2 versions, {files} files, built in "
          f"{time.perf_counter() - t:.0f} s -->")
    tonight = (FIRST_NIGHT + dt.timedelta(days=nights)).isoformat()
    rjob = config.load(None, [f"report.output={root}", f"report.night={tonight}", f"report.nights={nights}",
                              f"report.version={digest(0)}", f"report.candidate={digest(1)}", "report.gallery=0",
                              f"report.out={work}/report"], config.NightReportJob)
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    night = night_report.build(rjob)
    t1 = time.perf_counter()
    night_page.write(night, rjob)
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"| {nights} + 1 | {per_night:,} | {(nights + 1) * per_night * 2:,} | {t1 - t0:.2f} | {t2 - t1:.2f} | "
          f"{peak - start:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("example", "cost"))
    ap.add_argument("--per-night", type=int)
    ap.add_argument("--nights", type=int, default=7)
    ap.add_argument("--out", default=str(REPO / "docs" / "night_report_example"))
    args = ap.parse_args()
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print("command:", " ".join([Path(sys.executable).name] + sys.argv))
    work = tempfile.mkdtemp(prefix="night-week-")
    try:
        if args.what == "example":
            example(args.per_night or 60, args.out, work)
        else:
            print("| nights | rows a night | rows read (2 versions) | build s | page s | peak MiB over start |")
            print("|---|---|---|---|---|---|")
            cost(args.per_night or 10_000, args.nights, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
