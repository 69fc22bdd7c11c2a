"""Evaluate a checkpoint on a labelled set: one self-contained report.html plus metrics.json.

    python jobs/evaluate.py --checkpoint runs/neu/epoch-0069 --data /data/neu-det --out reports/neu
    python jobs/evaluate.py --checkpoint s3://models/sev/epoch-0020 --min-recall 1=0.95 --write-thresholds
    ray job submit --working-dir . -- python jobs/evaluate.py --checkpoint s3://... --out s3://.../report

--data is a folder or s3:// prefix in the format the model was trained on (empty: the training data
root stored in the checkpoint); --split val (default) evaluates the training run's own validation
split of it, --split all every image (a separate hold-out set). Thresholds are calibrated on the set
(best F1 per class, or --min-recall CLASS=R for classes that must not be missed; segmenters: pixel
threshold and minimum area per class); --write-thresholds stores them in the checkpoint for scoring.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from steelray import config  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or s3:// prefix")
    p.add_argument("--data", default="", help="labelled set root (default: the checkpoint's training data)")
    p.add_argument("--out", default="", help="report folder (default: reports/<model>-<checkpoint name>)")
    p.add_argument("--split", choices=("val", "all"), default="val")
    p.add_argument("--min-recall", action="append", default=[], metavar="CLASS=R",
                   help="keep recall >= R for CLASS (repeatable), e.g. 1=0.95 or crazing=0.98")
    p.add_argument("--write-thresholds", action="store_true",
                   help="store the calibrated thresholds in the checkpoint's meta.json (the old one is kept)")
    p.add_argument("--no-robustness", action="store_true", help="skip the glare/dim/crushed/blur/noise passes")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N images only")
    p.add_argument("overrides", nargs="*", help="data.key=value for the labelled set, s3.key=value")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from steelray import data, evaluate, report

    try:
        min_recall = {}
        for item in args.min_recall:
            name, sep, value = item.partition("=")
            if not sep:
                raise evaluate.EvaluationError(f"--min-recall {item!r}: expected CLASS=R, e.g. 1=0.95")
            try:
                min_recall[name] = float(value)
            except ValueError:
                raise evaluate.EvaluationError(f"--min-recall {item!r}: {value!r} is not a number") from None
        s3_items = [o for o in args.overrides if o.startswith("s3.")]
        s3 = config.load(None, s3_items).s3
        opts = evaluate.Options(args.checkpoint, args.data, args.split,
                                [o for o in args.overrides if not o.startswith("s3.")], min_recall,
                                not args.no_robustness, args.device, args.batch_size, limit=args.limit, s3=s3)
        ev = evaluate.run(opts)
    except (config.ConfigError, evaluate.EvaluationError, data.DataError, FileNotFoundError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.join("reports", f"{ev.meta['model']['name']}-{args.checkpoint.rstrip('/').rsplit('/', 1)[-1]}")
    written = report.write(ev, out)
    m = ev.before
    print(f"{ev.metric} {m[ev.metric]:.4f} on {len(ev.manifest)} images"
          + (f", accuracy {m['accuracy']:.4f}" if "accuracy" in m else "")
          + (f"; bright vs dim gap {ev.robustness['bright_dim_gap']:.4f}" if ev.robustness else ""))
    for ch in ev.calibration["chosen"]:
        print(f"  threshold {ch['class']}: {ch['threshold']:.3f} ({ch['policy']})")
    if args.write_thresholds:
        print(f"thresholds written to {evaluate.write_back(ev)}")
    print(f"metrics: {written['metrics.json']}")
    print(f"report: {written['report.html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
