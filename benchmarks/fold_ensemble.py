"""A fold ensemble judged on images none of its members saw (nested cross-validation, one outer fold).

Fold k of the recipe's own k-fold split is held out; the recipe is cross-validated on the rest
(``--inner`` folds, as ``jobs/crossval.py`` does: each inner fold model keeps its last epoch); then,
on the held-out images only, each inner fold model alone and their ensemble (``jobs/ensemble.py``),
each with and without TTA. The 5-fold figures of ``jobs/crossval.py --evaluate`` cannot judge an
ensemble: every fold model trained on the other folds' validation images.

    .ci/in-venv python benchmarks/fold_ensemble.py --config jobs/configs/neu.yaml \\
        --data ../shared/data/neu-det --out /tmp/nested --outer-fold 0 --tta none,dihedral

Resumable: the inner cross-validation is a Tune sweep under --out (rerun the same command). Writes
``<out>/fold_ensemble.json`` and prints a table. ``--dry-run`` writes the two image lists only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from steelray import config, config_loader, crossval, data, ensemble, evaluate  # noqa: E402


def image_lists(cfg: config.Config, out: str, outer_fold: int) -> tuple[list[str], list[str]]:
    """inner.csv (the images the inner folds split) and outer.csv (the held-out fold) under ``out``."""
    manifest = data.build_manifest(cfg)
    inner, outer = data.split(manifest, cfg.data)
    for name, part in (("inner.csv", inner), ("outer.csv", outer)):
        rows = part.records
        lines = ["image,label,group"] + [f"{u},{manifest.classes[lab[0]]},{g}"
                                         for u, lab, g in zip(rows.uri, rows.labels, rows.group)]
        with open(os.path.join(out, name), "w") as f:
            f.write("\n".join(lines) + "\n")
    return list(manifest.classes), [len(inner), len(outer)]


def csv_data(out: str, name: str, classes: list[str], in_chans: int) -> list[str]:
    return ["data.format=csv", f"data.root={out}", f"data.labels_csv={name}", "data.image_column=image",
            "data.label_columns=[label]", "data.group_column=group", f"data.classes=[{','.join(classes)}]",
            f"data.in_chans={in_chans}"]


def on_outer(checkpoint: str, out: str, classes: list[str], in_chans: int, tta: str, robustness: bool) -> dict:
    """``checkpoint`` (or ensemble) on every held-out image: accuracy, macro-F1, wrong images, and
    (``robustness``) the macro-F1 drop under each condition of ``steelray/conditions.py``."""
    labelled: dict = {}
    for item in csv_data(out, "outer.csv", classes, in_chans):
        config_loader.apply_override(labelled, item)  # the values parsed as a command line's are
    job = config.EvaluateJob(evaluate=config.EvaluateConfig(checkpoint=checkpoint, split="all", tta=tta,
                                                            robustness=robustness),
                             data=labelled["data"])
    ev = evaluate.run(job)
    n = len(ev.manifest)
    wrong = ev.wrong_images()
    return {"images": n, "accuracy": ev.before["accuracy"], "macro_f1": ev.before["macro_f1"],
            "wrong": len(wrong), "wrong_images": [f"{w['image_id']} -> {w['predicted']}" for w in wrong],
            "drops": {name: round(row["drop"], 4) for name, row in ev.robustness.get("conditions", {}).items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="jobs/configs/neu.yaml")
    p.add_argument("--data", required=True, help="the labelled set (data.root)")
    p.add_argument("--out", required=True)
    p.add_argument("--outer-folds", type=int, default=5, help="the split the held-out fold comes from")
    p.add_argument("--outer-fold", type=int, default=0)
    p.add_argument("--inner", type=int, default=4, help="folds of the inner cross-validation")
    p.add_argument("--tta", default="none,dihedral")
    p.add_argument("--robustness", action="store_true", help="the condition passes too (drops in macro-F1)")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("overrides", nargs="*", help="key=value settings over the config (e.g. train.epochs=2)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    base = [f"data.root={args.data}", *args.overrides]
    cfg = config.load(args.config, [*base, f"data.folds={args.outer_folds}", f"data.fold={args.outer_fold}"])
    classes, sizes = image_lists(cfg, args.out, args.outer_fold)
    print(f"inner images {sizes[0]}, held-out images {sizes[1]} (fold {args.outer_fold} of {args.outer_folds})")
    if args.dry_run:
        return 0
    inner = config.load(args.config, [*base, *csv_data(args.out, "inner.csv", classes, cfg.data.in_chans),
                                      f"data.folds={args.inner}", f"ray.storage_path={args.out}", "tune.name=inner"])
    cv = crossval.run(inner)
    members = ensemble.fold_models(cv["sweep"])
    ens = os.path.join(args.out, "ensemble")
    ensemble.write(ens, members)
    result = {"config": args.config, "overrides": args.overrides, "outer": f"fold {args.outer_fold} of "
              f"{args.outer_folds} (seed {cfg.data.seed})", "held_out_images": sizes[1], "inner_images": sizes[0],
              "inner_folds": args.inner, "train_seconds": {f"inner fold {r['fold']}": r["seconds"] for r in cv["per_fold"]},
              "rows": []}
    for tta in args.tta.split(","):
        for i, member in enumerate(members):
            result["rows"].append({"model": f"inner fold {i}", "tta": tta, **on_outer(member, args.out, classes,
                                                                                     cfg.data.in_chans, tta, args.robustness)})
        result["rows"].append({"model": f"ensemble of {len(members)}", "tta": tta,
                               **on_outer(ens, args.out, classes, cfg.data.in_chans, tta, args.robustness)})
    with open(os.path.join(args.out, "fold_ensemble.json"), "w") as f:
        json.dump(result, f, indent=1)
    conditions = list(result["rows"][0]["drops"])
    print("| model | TTA | accuracy | macro-F1 | wrong | " + "".join(f"{c} drop | " for c in conditions)
          + "which\n|" + "---|" * (6 + len(conditions)))
    for r in result["rows"]:
        print(f"| {r['model']} | {r['tta']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {r['wrong']} of {r['images']} | "
              + "".join(f"{r['drops'][c]:.3f} | " for c in conditions) + ", ".join(r["wrong_images"]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
