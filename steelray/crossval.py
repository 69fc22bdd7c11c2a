"""Cross-validation of a training recipe (``jobs/crossval.py``): the config trained on each of its
``data.folds`` stratified, grouped folds, and each fold's best and last-epoch figures with their
mean and spread across folds: how a recipe is judged, rather than on the one split that chose it.

The folds are the trials of one Ray Tune grid over ``data.fold`` (``tune.run``): independent Ray
Train runs, as many at once as the cluster holds, and a killed run resumes where it stopped. The
sweep folder (``<ray.storage_path>/<tune.name>``) gets ``folds.csv`` (a row per fold) and
``crossval.json`` (the rows and the aggregate). ``evaluate_folds`` then evaluates each fold model on
its own validation images, under the robustness conditions and with test-time augmentation
(``evaluation.json``): figures no fold model chose anything on, since each keeps its last epoch. With other sweeps over the
same folds (the recipe again with another ``train.seed``), it judges each fold by the ensemble of
their fold models instead: an ensemble recipe's cross-validated figure.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence

import pandas as pd

from steelray import config, storage, tracking, tune
from steelray.config import Config

# Validation figures aggregated where the training run reports them.
FIGURES = ("accuracy", "macro_f1", "micro_f1", "roc_auc", "dice", "val_loss")


def cv_config(cfg: Config) -> Config:
    """The sweep that is the cross-validation: one trial per fold, no early stopping, each fold keeping
    its last epoch's checkpoint (the best one would be chosen on the split it is judged on)."""
    if cfg.data.folds < 2:
        raise config.ConfigError(f"data.folds: cross-validation needs >= 2 folds, got {cfg.data.folds}")
    raw = config.to_dict(cfg, redact=False)
    name = cfg.tune.name or f"cv{cfg.data.folds}-{cfg.task}-{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    raw["train"] = {**raw["train"], "keep": "last"}
    raw["tune"] = {**raw["tune"], "name": name, "search": "grid", "scheduler": "none", "num_samples": 0,
                   "space": {"data.fold": {"grid": list(range(cfg.data.folds))}}}
    return config.from_dict(raw)


def run(cfg: Config) -> dict:
    """Train ``cfg`` on each fold; returns (and writes) the per-fold rows and their aggregate."""
    cv = cv_config(cfg)
    swept = tune.run(cv)
    metric = swept.metric
    rows = [fold_row(swept.sweep_uri, trial, cv, metric) for trial in swept.trials.to_dict("records")]
    folds = pd.DataFrame(rows).sort_values("fold").reset_index(drop=True)
    done = folds[folds.status == "completed"]  # a fold stopped part-way (a killed run) is not averaged in
    result = {"sweep": swept.sweep_uri, "metric": metric, "folds": cfg.data.folds, "seed": cfg.data.seed,
              "epochs": cfg.train.epochs, "completed": len(done), "aggregate": aggregate(done),
              "per_fold": folds.to_dict("records")}
    storage.write_text(storage.join(swept.sweep_uri, "folds.csv"), folds.to_csv(index=False), cfg.s3)
    text = json.dumps(result, indent=1, default=_plain)
    storage.write_text(storage.join(swept.sweep_uri, "crossval.json"), text, cfg.s3)
    # the sweep's MLflow run (where tracked) gets the figures over the folds: cv_<figure>_mean / _std
    run = tracking.start(cv.tracking, cv.tracking.experiment or f"steelray-{cv.task}", cv.tune.name,
                         key=("steelray.sweep_uri", swept.sweep_uri))
    run.log_metrics({f"cv_{k}_{s}": a[s] for k, a in result["aggregate"].items() for s in ("mean", "std")})
    run.log_text(text, "crossval.json")
    run.log_text(folds.to_csv(index=False), "folds.csv")
    run.end()
    return result


def fold_row(sweep_uri: str, trial: dict, cfg: Config, metric: str) -> dict:
    """A fold's figures at its best epoch (by ``metric``, as training keeps its checkpoint) and at its last."""
    history = tune.train_history(sweep_uri, trial["trial_id"], cfg, pd.DataFrame())
    row = {"fold": int(trial["data.fold"]), "trial_id": trial["trial_id"], "status": trial["status"],
           "seconds": trial["seconds"], "checkpoint": trial["checkpoint"], "error": trial["error"]}
    if history.empty or metric not in history:
        return row
    best = tune.best_epoch(history, metric, tune.kept_epochs(sweep_uri, trial["trial_id"], cfg))
    last = history.sort_values("epoch").iloc[-1]
    row.update(best_epoch=int(best["epoch"]), last_epoch=int(last["epoch"]))
    for name in (n for n in FIGURES if n in history):
        row[f"best_{name}"], row[f"last_{name}"] = float(best[name]), float(last[name])
    return row


def evaluate_folds(sweep_uri: str, tta: list[str], s3: config.S3Config | None = None,
                   ensemble_with: Sequence[str] = (), route_with: str = "") -> dict:
    """Each fold model (``ensemble.fold_models``) evaluated on its fold's validation images, robustness
    passes included, once per TTA mode in ``tta``: per fold the accuracy and macro-F1 (at the model's
    own decision), the wrong images and each condition's drop; their aggregate; and the out-of-fold
    figures, each image judged by the one model that never trained on it. Written to
    ``<sweep>/evaluation.json``.

    With ``ensemble_with`` (other sweeps over the same folds, e.g. the recipe again with another
    ``train.seed``), fold k is judged as the ensemble of every sweep's fold-k model: none of them
    trained on fold k, so this is an ensemble recipe's cross-validated figure. The ensembles are
    written to ``<sweep>/ensemble-<digest of the sweeps>/fold-<k>``, the figures to ``evaluation.json``
    there. With ``route_with`` (a sweep of a model for clipped images over the same folds, e.g. the
    ``dark`` preset), fold k's ensemble routes clipped images to that sweep's fold-k model, at the
    share ``predict.route_gate`` finds in fold k's training images."""
    from steelray import ensemble

    s3 = s3 or config.S3Config()
    models = ensemble.fold_models(sweep_uri, s3)
    out, result = sweep_uri, {"sweep": sweep_uri, "folds": len(models), "tta": {}}
    if ensemble_with or route_with:
        sweeps = [sweep_uri, *ensemble_with]
        key = "\n".join(sweeps + ([f"route {route_with}"] if route_with else []))
        out = storage.join(sweep_uri, "ensemble-" + hashlib.sha256(key.encode()).hexdigest()[:8])
        models = fold_ensembles(sweeps, out, s3, route_with)
        result.update(sweeps=sweeps, members=len(sweeps))
        if route_with:
            result.update(route_sweep=route_with,
                          route_above=[ensemble.read(m, s3)["route"]["black_share_above"] for m in models])
    for mode in tta:
        rows = [_fold_figures(fold, checkpoint, mode, s3) for fold, checkpoint in enumerate(models)]
        folds = pd.DataFrame([{k: v for k, v in r.items() if k != "wrong_images"} for r in rows])
        pooled = {"images": int(folds.images.sum())}
        if "wrong" in folds:
            pooled.update(wrong=int(folds.wrong.sum()), accuracy=1 - folds.wrong.sum() / folds.images.sum(),
                          wrong_images=[{"fold": r["fold"], **w} for r in rows for w in r["wrong_images"]])
        result["tta"][mode] = {"per_fold": rows, "out_of_fold": pooled,
                               "aggregate": aggregate(folds, ("accuracy", "macro_f1", "wrong", "drop_"))}
    result["written_to"] = storage.join(out, "evaluation.json")
    storage.write_text(result["written_to"], json.dumps(result, indent=1, default=_plain), s3)
    return result


def fold_ensembles(sweeps: list[str], out: str, s3: config.S3Config, route_sweep: str = "") -> list[str]:
    """Fold k's ensemble of every sweep's fold-k model, in ``<out>/fold-<k>``, routing clipped images
    to ``route_sweep``'s fold-k model where given; refused unless the sweeps have as many folds and
    each fold's models were split from the same data the same way."""
    from steelray import ensemble, predict

    sweeps = [*sweeps, *([route_sweep] if route_sweep else [])]
    per_sweep = [ensemble.fold_models(s, s3) for s in sweeps]
    if len({len(m) for m in per_sweep}) > 1:
        raise ensemble.EnsembleError("sweeps with different numbers of folds: " + ", ".join(
            f"{s} ({len(m)})" for s, m in zip(sweeps, per_sweep)))
    per_fold = list(zip(*per_sweep))
    for fold, members in enumerate(per_fold):  # every fold checked before any ensemble is written
        split = [predict.read_meta(m, s3)["config"]["data"] for m in members]
        for sweep, member, d in zip(sweeps[1:], members[1:], split[1:]):
            differ = sorted(k for k in set(d) | set(split[0]) if d.get(k) != split[0].get(k))
            if differ:
                raise ensemble.EnsembleError(
                    f"fold {fold}: {member} (sweep {sweep}) was not trained on the same split as {members[0]}: "
                    + ", ".join(f"data.{k} {d.get(k)!r} against {split[0].get(k)!r}" for k in differ))
    folders = [storage.join(out, f"fold-{fold}") for fold in range(len(per_fold))]
    for folder, members in zip(folders, per_fold):
        if route_sweep:
            *members, routed = members
            ensemble.write(folder, members, s3, (routed, predict.route_gate(routed, s3)))
        else:
            ensemble.write(folder, list(members), s3)
    return folders


def _fold_figures(fold: int, checkpoint: str, tta: str, s3: config.S3Config) -> dict:
    """One fold model (or ensemble) on its fold's validation images: accuracy, macro-F1, wrong, drops."""
    from steelray import evaluate

    job = config.EvaluateJob(evaluate=config.EvaluateConfig(checkpoint=checkpoint, split="val", tta=tta), s3=s3)
    ev = evaluate.run(job)
    images = len(ev.manifest)
    row = {"fold": fold, "checkpoint": checkpoint, "epoch": ev.meta.get("epoch"), "images": images}
    row.update({k: float(ev.before[k]) for k in ("accuracy", "macro_f1") if k in ev.before})
    if ev.probs is not None:  # classifiers: which images, and taken for what
        row["wrong_images"] = ev.wrong_images()
        row["wrong"] = len(row["wrong_images"])
    row.update({f"drop_{name}": float(r["drop"]) for name, r in ev.robustness["conditions"].items()})
    return row


def aggregate(folds: pd.DataFrame, prefixes: tuple[str, ...] = ("best_", "last_")) -> dict:
    """Per figure (the columns starting with one of ``prefixes``): the mean, the sample standard
    deviation, the lowest and highest over the folds that report it, and how many did."""
    out = {}
    for column in (c for c in folds.columns if c.startswith(prefixes) and not c.endswith("_epoch")):
        values = folds[column].dropna().astype(float)
        if len(values):
            out[column] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
                           "min": float(values.min()), "max": float(values.max()), "folds": int(len(values))}
    return out


def _plain(value):
    return value.item() if hasattr(value, "item") else None if value is pd.NA else str(value)
