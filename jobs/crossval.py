"""Judge a training recipe by k-fold cross-validation: the config trained on each of data.folds
stratified, grouped folds (Ray Tune trials, in parallel where the cluster holds them), each fold's
best and last-epoch validation figures, and their mean and spread.

    python jobs/crossval.py --config jobs/configs/neu.yaml data.root=/data/neu-det data.folds=5
    ray job submit --working-dir . -- python jobs/crossval.py --config jobs/configs/<x>.yaml data.folds=5

Writes folds.csv and crossval.json in the sweep folder (<ray.storage_path>/<tune.name>; rerun with the
same tune.name to resume). Each fold's run keeps its last epoch's checkpoint there: the fold models,
e.g. for an ensemble. `--evaluate none,dihedral` then evaluates each fold model on its own validation
images, under the robustness conditions, once per TTA mode (evaluation.json; a finished sweep is only
evaluated). `--ensemble-with <sweep>[,<sweep>]` (sweeps of the same folds: this config again with another
train.seed and tune.name) evaluates instead each fold's ensemble of every sweep's fold model on that
fold's images: the cross-validated figure of an ensemble recipe (<sweep>/ensemble-<digest>/).
`--route-with <sweep>` (a model for clipped sheets over the same folds, e.g. input.augment=dark) makes
each fold's ensemble route the images with a clipped share above the fold's training images' to it.
The last line printed is the target metric of the kept (last-epoch) models: mean and spread over the
folds (each fold's best epoch, chosen on the images it is measured on, is in the table only).
"""

from __future__ import annotations

import argparse
import os
import sys

from steelray import cli, config

EXIT_CODES = {cli.DONE: "every fold trained; the figures are written",
              cli.FAILED: "a fold failed or did not finish (its error is printed; the finished folds' figures "
                          "are written): rerun the same command to resume",
              cli.BAD_ARGUMENTS: "bad config (data.folds < 2, ...), or --ensemble-with sweeps not of the same "
                                 "folds or not finished: do not retry before fixing it"}

os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "10")  # as jobs/tune.py: what a killed run can lose


def tta_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("none", "flips", "dihedral")]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"{text!r}: TTA modes are none, flips, dihedral (comma-separated)")
    return modes


def main(argv=None) -> int:
    parser = cli.parser(__doc__, EXIT_CODES, config_required=True, config_help="YAML training config; data.folds >= 2")
    parser.add_argument("--evaluate", type=tta_modes, default=[], metavar="TTA[,TTA]",
                        help="also evaluate each fold model on its validation images, per TTA mode: none, flips, dihedral")
    parser.add_argument("--ensemble-with", default="", metavar="SWEEP[,SWEEP]",
                        help="with --evaluate: judge each fold by the ensemble of this sweep's fold model and "
                             "these sweeps' (same folds, e.g. another train.seed)")
    parser.add_argument("--route-with", default="", metavar="SWEEP",
                        help="with --evaluate: each fold's ensemble routes clipped images to this sweep's fold model "
                             "(same folds, e.g. input.augment=dark), at the black share of the fold's training images")
    args = parser.parse_args(argv)
    others = [s.strip() for s in args.ensemble_with.split(",") if s.strip()]
    if (others or args.route_with) and not args.evaluate:
        parser.error("--ensemble-with and --route-with need --evaluate (the TTA modes to evaluate the ensembles with)")
    try:
        cfg = cli.load(args, config.Config)
        from steelray import crossval, train, tune

        train.target_metric(cfg)
        crossval.cv_config(cfg)
        if "dihedral" in args.evaluate and not cfg.input.turns:  # refused now, not after hours of training
            raise config.ConfigError("--evaluate dihedral: input.turns is false, so the fold models never see "
                                     "a turned image (evaluate with flips)")
    except (config.ConfigError, FileNotFoundError) as e:
        print(f"crossval: {e}", file=sys.stderr)
        return cli.BAD_ARGUMENTS
    try:
        result = crossval.run(cfg)
    except tune.SweepError as e:
        print(f"crossval: {e}", file=sys.stderr)
        return cli.FAILED
    import pandas as pd

    folds = pd.DataFrame(result["per_fold"])
    shown = [c for c in folds.columns if c not in ("checkpoint", "error", "trial_id")]
    print(folds[shown].to_string(index=False))
    for row in folds[folds.status == "failed"].itertuples():
        print(f"fold {row.fold} failed: {row.error}")
    print(f"sweep folder: {result['sweep']}")
    for name, a in result["aggregate"].items():
        print(f"{name}: {a['mean']:.4f} ± {a['std']:.4f} (min {a['min']:.4f}, max {a['max']:.4f}, {a['folds']} folds)")
    if args.evaluate and result["completed"] < result["folds"]:
        print(f"--evaluate waits for every fold: {result['completed']} of {result['folds']} completed")
    elif args.evaluate:
        from steelray import ensemble

        try:
            evaluated = crossval.evaluate_folds(result["sweep"], args.evaluate, cfg.s3, others, args.route_with)
        except ensemble.EnsembleError as e:
            print(f"crossval: {e}", file=sys.stderr)
            return cli.BAD_ARGUMENTS
        what = f"ensembles of {len(others) + 1} sweeps' fold models" if others or args.route_with else "fold models"
        if args.route_with:
            what += f", clipped images to {args.route_with}'s (shares {evaluated['route_above']})"
        print(f"evaluation: {evaluated['written_to']}")
        for mode, ev in evaluated["tta"].items():
            print(f"{what} on their own validation images, tta {mode}: " + ", ".join(
                f"{k} {a['mean']:.4f} ± {a['std']:.4f} (max {a['max']:.4f})" for k, a in ev["aggregate"].items()))
            if "wrong" in ev["out_of_fold"]:
                o = ev["out_of_fold"]
                print(f"  out of fold: {o['wrong']} of {o['images']} images wrong, accuracy {o['accuracy']:.4f}")
                for w in o["wrong_images"]:
                    print(f"    fold {w['fold']}: {w['image_id']} ({w['label']}) taken for {w['predicted']}")
    # the kept models' figure (each fold's last epoch): best_* was chosen on the images it is measured on
    m = result["aggregate"].get(f"last_{result['metric']}")
    print(f"{result['metric']} of the kept (last-epoch) models over {m['folds'] if m else 0} of {result['folds']} "
          "folds: " + (f"{m['mean']:.4f} ± {m['std']:.4f}" if m else "no fold finished"))
    return cli.FAILED if result["completed"] < result["folds"] else cli.DONE


if __name__ == "__main__":
    sys.exit(main())
