"""Evaluate a checkpoint on a labelled set: one self-contained report.html plus metrics.json.

    python jobs/evaluate.py --checkpoint runs/neu/epoch-0069 --data /data/neu-det --out reports/neu
    python jobs/evaluate.py --checkpoint s3://models/sev/epoch-0020 --min-recall 1=0.95 --write-thresholds
    ray job submit --working-dir . -- python jobs/evaluate.py --checkpoint s3://... --out s3://.../report

--data is a folder or s3:// prefix in the format the model was trained on (empty: the training data
root stored in the checkpoint); --split val (default) evaluates the training run's own validation
split of it, --split all every image (a separate hold-out set). Thresholds are calibrated on the set
(best F1 per class, or --min-recall CLASS=R for classes that must not be missed; segmenters: pixel
threshold and minimum area per class); --write-thresholds stores them in the checkpoint for scoring.
Settings: `evaluate.*`, `data.*` (the labelled set, over the checkpoint's own) and `s3.*`.
"""

from __future__ import annotations

import os
import sys

from steelray import cli, config

EXIT_CODES = {cli.DONE: "report written", cli.BAD_ARGUMENTS: "bad arguments, checkpoint or labelled set",
              cli.BUSY: "a models:/ checkpoint and the MLflow server cannot be reached: retry later"}


def main(argv=None) -> int:
    p = cli.parser(__doc__, EXIT_CODES, config_help="YAML with evaluate:, data: and s3: sections (optional)")
    p.add_argument("--checkpoint", help="checkpoint folder or s3:// prefix, or models:/<name>@<alias> "
                                        "(evaluate.checkpoint)")
    p.add_argument("--data", help="labelled set root (data.root; default: the checkpoint's training data)")
    p.add_argument("--out", help="report folder (evaluate.out; default: reports/<model>-<checkpoint name>)")
    p.add_argument("--split", choices=("val", "all"), help="evaluate.split (default val)")
    p.add_argument("--min-recall", action="append", default=[], metavar="CLASS=R",
                   help="keep recall >= R for CLASS (repeatable), e.g. 1=0.95 or crazing=0.98")
    p.add_argument("--write-thresholds", action="store_true",
                   help="store the calibrated thresholds in the checkpoint's meta.json (the old one is kept)")
    p.add_argument("--no-robustness", action="store_true", help="skip the glare/dim/crushed/blur/noise passes")
    p.add_argument("--tta", choices=("none", "flips", "dihedral"),
                   help="test-time augmentation, as score.tta (evaluate.tta; default none)")
    args = p.parse_args(argv)
    flags = [f"evaluate.{k}={v}" for k in ("checkpoint", "out", "split", "tta") if (v := getattr(args, k))]
    flags += [f"data.root={args.data}"] * bool(args.data) + ["evaluate.write_thresholds=true"] * args.write_thresholds
    flags += ["evaluate.robustness=false"] * args.no_robustness
    from steelray import evaluate, images, registry, report, tracking

    try:
        for item in args.min_recall:
            name, sep, value = item.partition("=")
            if not sep:
                raise config.ConfigError(f"--min-recall {item!r}: expected CLASS=R, e.g. 1=0.95")
            flags.append(f"evaluate.min_recall.{name}={value}")
        job = cli.load(args, config.EvaluateJob, flags)
        ev = evaluate.run(job)
    except (config.ConfigError, evaluate.EvaluationError, images.DataError, FileNotFoundError,
            registry.RegistryError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return cli.BAD_ARGUMENTS
    except tracking.TrackingUnavailable as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return cli.BUSY
    opts = job.evaluate
    out = opts.out or os.path.join("reports", f"{ev.meta['model']['name']}-{opts.checkpoint.rstrip('/').rsplit('/', 1)[-1]}")
    written = report.write(ev, out)
    m = ev.before
    print(f"{ev.metric} {m[ev.metric]:.4f} on {len(ev.manifest)} images"
          + (f", accuracy {m['accuracy']:.4f}" if "accuracy" in m else "")
          + (f"; bright vs dim gap {ev.robustness['bright_dim_gap']:.4f}" if ev.robustness else ""))
    for ch in ev.calibration["chosen"]:
        print(f"  threshold {ch['class']}: {ch['threshold']:.3f} ({ch['policy']})")
    if opts.write_thresholds:
        print(f"thresholds written to {evaluate.write_back(ev)}")
    if reference := evaluate.keep_reference(ev):
        print(f"probabilities kept for the night report's drift reference: {reference}")
    print(f"metrics: {written['metrics.json']}")
    print(f"report: {written['report.html']}")
    if job.tracking.uri:
        run = evaluate.track(ev, written)
        print(run.summary() + (f" (the run that trained {opts.checkpoint})"
                               if run.run_id and run.run_id == ev.meta.get("mlflow_run_id") else ""))
    return cli.DONE


if __name__ == "__main__":
    sys.exit(main())
