"""Make an ensemble: several checkpoints of one task and class set whose probabilities are averaged,
usable wherever a checkpoint is (jobs/evaluate.py, jobs/score.py, jobs/night_report.py).

    python jobs/ensemble.py --crossval runs/cv5-multiclass-resnet10t --out runs/neu-folds
    python jobs/ensemble.py --members runs/a/epoch-0030 runs/b/epoch-0042 --out s3://plant/models/ens-1
    python jobs/evaluate.py --checkpoint runs/neu-folds --write-thresholds   # thresholds on the averages
    python jobs/ensemble.py --members runs/a/epoch-0070 --route runs/dark --route-above 0.13 --out runs/routed

Writes <out>/ensemble.json (the members, the task, the classes, thresholds: the members' mean, or the
argmax for a multi-class task, until evaluation calibrates them). Members must take the same input
size and channels, and be all checkpoint folders or all exported .onnx files. Its model version in a
scoring output is the digest of the members' versions, its route, its thresholds and score.tta.
--route sends each image with more than --route-above of its pixels black (0, in the model's input:
under-exposed, shadows clipped) to that model alone, e.g. one trained on under-exposed sheets
(benchmarks/crushed_routing.py measures a pair and picks the share from the training images).
"""

from __future__ import annotations

import argparse
import sys

from steelray import cli, config


EXIT_CODES = {cli.DONE: "written", cli.BAD_ARGUMENTS: "bad members (another task or classes, missing, not finished)"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="exit status:\n" + "\n".join(f"  {c}  {w}" for c, w in EXIT_CODES.items()))
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--members", nargs="+", help="checkpoint folders (or exported .onnx files)")
    source.add_argument("--crossval", help="a jobs/crossval.py sweep folder: its fold models")
    p.add_argument("--out", required=True, help="the ensemble's folder (local or s3://)")
    p.add_argument("--route", default="", help="a model for clipped images (checkpoint folder or .onnx, as the members)")
    p.add_argument("--route-above", type=float, default=None, metavar="SHARE",
                   help="with --route: the share of black pixels (0-1) above which an image goes to it")
    p.add_argument("overrides", nargs="*", help="s3.* settings, e.g. s3.endpoint_url=...")
    args = p.parse_args(argv)
    if bool(args.route) != (args.route_above is not None):
        p.error("--route and --route-above go together")
    from steelray import ensemble

    try:
        s3 = config.load(None, args.overrides, config.EvaluateJob).s3
        members = args.members or ensemble.fold_models(args.crossval, s3)
        spec = ensemble.write(args.out, members, s3, (args.route, args.route_above) if args.route else None)
    except (config.ConfigError, ensemble.EnsembleError, FileNotFoundError) as e:
        print(f"ensemble: {e}", file=sys.stderr)
        return cli.BAD_ARGUMENTS
    print(f"ensemble of {len(spec['members'])} {spec['task']} models over {', '.join(map(str, spec['classes']))}: "
          f"{args.out.rstrip('/')}/{ensemble.FILE}" + (f"; clipped images (> {args.route_above:g} black) to {args.route}"
                                                        if args.route else ""))
    return cli.DONE


if __name__ == "__main__":
    sys.exit(main())
