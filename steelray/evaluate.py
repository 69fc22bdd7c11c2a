"""Evaluation of one checkpoint on a labelled set: metrics, calibrated thresholds, robustness.

    ev = evaluate.run(config.load(None, ["evaluate.checkpoint=runs/neu/epoch-0069", "data.root=/data/neu-det"],
                                  config.EvaluateJob))

The model is loaded as a plain ``nn.Module`` (no Ray) and applied to every image of the set (the
training run's validation split by default, rebuilt from the config stored in the checkpoint);
probabilities are kept, so thresholds can be calibrated and metrics recomputed at any threshold
without another pass. Segmenters keep, per image and class, the predicted area and overlap at a set
of candidate pixel thresholds (at the sheet's own size, as scoring computes masks), enough for
Kaggle's Dice at any threshold and minimum area. Robustness re-runs the set under glare, dimming,
under-exposure, blur and noise. ``report.write`` turns the result into ``report.html`` and ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from dataclasses import dataclass

import numpy as np

from steelray import checkpoint, conditions, config, data, ensemble, metrics, model_io, onnx_model, predict, storage

log = logging.getLogger(__name__)

MIN_AREAS = (0, 100, 200, 400, 800, 1600, 3200, 6400, 12800)    # pixels at the sheet's own size
GRID = np.round(np.linspace(0.01, 0.99, 99), 2)                  # trade-off curves
ROBUSTNESS_TARGET = 0.03  # the field's bright-vs-dim macro-F1 gap is 0.06; ours should stay under this


class EvaluationError(ValueError):
    """The checkpoint, the data or an option cannot be evaluated as given."""


@dataclass
class Evaluation:
    """Everything the report shows; ``summary()`` is the JSON-ready part."""

    job: config.EvaluateJob
    meta: dict
    cfg: config.Config
    classes: list[str]                   # output names (binary: the defect class alone)
    manifest: data.Manifest
    probs: np.ndarray | None             # classifiers: (N,) binary or (N, C)
    targets: np.ndarray | None
    stats: dict | None                   # segmenters: pooled ``metrics.mask_stats``
    before: dict                         # metrics at the checkpoint's thresholds
    after: dict                          # metrics at the calibrated thresholds
    calibration: dict
    robustness: dict
    started: str

    @property
    def task(self) -> str:
        return self.meta["task"]

    @property
    def metric(self) -> str:
        return "dice" if self.task == "segmentation" else "macro_f1"

    def wrong_images(self) -> list[dict]:
        """A classifier's mistakes at the checkpoint's own decision (``metrics.decide``): image id,
        label and prediction, by class name ("+"-joined for several labels, "none" for none)."""
        pred = metrics.decide(self.task, self.probs, self.meta["thresholds"])
        truth = np.asarray(self.targets)
        if self.task == "multiclass":
            named = [(self.classes[t], self.classes[p]) for t, p in zip(truth, pred)]
        else:
            def name(row):
                return "+".join(c for c, v in zip(self.classes, np.atleast_1d(row)) if v) or "none"

            named = [(name(t), name(p)) for t, p in zip(truth, pred)]
        return [{"image_id": i, "label": t, "predicted": p}
                for i, (t, p) in zip(self.manifest.records.image_id, named) if t != p]

    def summary(self) -> dict:
        counts = self.manifest.class_counts()
        return {
            "checkpoint": self.job.evaluate.checkpoint, "model": self.meta.get("model", {}), "task": self.task,
            "exported": self.meta.get("export"), "tta": self.job.evaluate.tta,
            "classes": self.classes, "evaluated_at": self.started, "epoch": self.meta.get("epoch"),
            "data": {"root": self.cfg.data.root, "format": self.cfg.data.format, "split": self.job.evaluate.split,
                     "images": len(self.manifest), "class_counts": counts},
            "metric": self.metric, "metrics": self.before, "metrics_calibrated": self.after,
            "calibration": self.calibration, "robustness": self.robustness,
            "training_metrics": self.meta.get("metrics", {}), "weaknesses": weaknesses(self),
        }


def run(job: config.EvaluateJob) -> Evaluation:
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    if not job.evaluate.checkpoint:
        raise EvaluationError("evaluate.checkpoint: required (a checkpoint folder written by jobs/train.py)")
    from steelray import registry

    job = dataclasses.replace(job, evaluate=dataclasses.replace(  # models:/<name>@<alias> -> its checkpoint
        job.evaluate, checkpoint=registry.resolve(job.evaluate.checkpoint, job.tracking, job.s3)))
    if job.evaluate.write_thresholds and onnx_model.is_exported(job.evaluate.checkpoint):
        raise EvaluationError(f"{job.evaluate.checkpoint}: an exported model carries the thresholds it was "
                              "exported with; calibrate its checkpoint (--write-thresholds there) and export again")
    meta = predict.read_meta(job.evaluate.checkpoint, job.s3)
    try:
        model_io.check_tta(job.evaluate.tta, model_io.Preprocess.from_dict(meta["preprocess"]), "evaluate.tta",
                           model_io.trained_turned(meta))
    except ValueError as e:
        raise EvaluationError(str(e)) from None
    cfg = labelled_set_config(meta, job)
    manifest = select(data.build_manifest(cfg), cfg, job)
    task = meta["task"]
    classes = ["defect"] if task == "binary" else list(meta["classes"])
    if list(manifest.classes) != list(meta["classes"]):
        raise EvaluationError(f"{cfg.data.root}: classes {manifest.classes} differ from the checkpoint's "
                              f"{meta['classes']}")
    unknown = sorted(set(job.evaluate.min_recall) - set(classes))
    if unknown:
        raise EvaluationError(f"min recall for {', '.join(unknown)}: not a class of this model; classes: "
                              f"{', '.join(classes)}")
    bad = {c: r for c, r in job.evaluate.min_recall.items() if not 0 < r <= 1}
    if bad:
        raise EvaluationError(f"min recall must be in (0, 1], got {bad}")
    model = predict.load_model(job)
    thresholds = np.asarray(meta["thresholds"], dtype=float)
    log.info("evaluating %s on %d images (%s)", job.evaluate.checkpoint, len(manifest), manifest.summary())
    if task == "segmentation":
        min_area = np.asarray(meta.get("min_area") or [0] * len(classes))
        stats = predict.predict_masks(model, meta, manifest, job)
        before = metrics.segmentation_detail(stats, classes, thresholds, min_area)
        calibration = calibrate_segmenter(stats, classes, job.evaluate.min_recall, thresholds, min_area)
        after = metrics.segmentation_detail(stats, classes, calibration["thresholds"], calibration["min_area"])
        probs = targets = None
    else:
        targets = manifest.targets(task)
        probs = predict.predict(model, meta, manifest, job)
        before = metrics.classification_detail(task, probs, targets, classes, thresholds)
        calibration = calibrate_classifier(task, probs, targets, classes, job.evaluate.min_recall, thresholds)
        after = metrics.classification_detail(task, probs, targets, classes, calibration["thresholds"])
        stats = None
    ev = Evaluation(job, meta, cfg, classes, manifest, probs, targets, stats, before, after, calibration, {}, started)
    if job.evaluate.robustness:
        ev.robustness = robustness(model, ev)
    return ev


def labelled_set_config(meta: dict, job: config.EvaluateJob) -> config.Config:
    """The checkpoint's own training config with the job's ``data.*`` settings for the labelled set
    (another root, format options...) and its S3 settings; checked as training checks it."""
    raw = meta["config"]
    raw = {k: v for k, v in raw.items() if k in {f.name for f in dataclasses.fields(config.Config)}}
    cfg_raw = config.to_dict(config.from_dict(raw), redact=False)
    cfg_raw["s3"] = config.to_dict(job.s3, redact=False)
    cfg_raw["data"].update(job.data)
    if job.evaluate.split == "all" or "root" in job.data:  # another set: all of it
        cfg_raw["data"]["limit"] = job.data.get("limit", 0)
    return config.from_dict(cfg_raw)


def select(manifest: data.Manifest, cfg: config.Config, job: config.EvaluateJob) -> data.Manifest:
    if job.evaluate.split not in ("val", "all"):
        raise EvaluationError(f"split: {job.evaluate.split!r} is not one of val, all")
    if job.evaluate.split == "val":
        _, manifest = data.split(manifest, cfg.data)
    if job.evaluate.limit:
        manifest = manifest.subset(np.arange(min(job.evaluate.limit, len(manifest))))
    if not len(manifest):
        raise EvaluationError(f"{cfg.data.root}: no images to evaluate ({job.evaluate.split} split)")
    return manifest


# --- calibration --------------------------------------------------------------------------------

def calibrate_classifier(task: str, probs: np.ndarray, targets: np.ndarray, classes: list[str],
                         min_recall: dict[str, float], current: np.ndarray) -> dict:
    """Per-class thresholds: the one maximising F1, or, for the classes in ``min_recall``, the
    highest threshold that keeps recall at or above the target (the best precision it allows).
    Multiclass keeps the argmax (thresholds 0.5) except for the min-recall classes, whose threshold
    is lowered under ``metrics.decide``'s rule until the recall is met."""
    n_out = len(classes)
    thresholds = np.full(n_out, 0.5) if task == "multiclass" else np.array(current, dtype=float).copy()
    policy = ["argmax" if task == "multiclass" else "max F1"] * n_out
    onehot = np.eye(n_out, dtype=int)[targets] if task == "multiclass" else targets.reshape(len(targets), -1)
    for c, name in enumerate(classes):
        positives = int(onehot[:, c].sum())
        if positives == 0:
            policy[c] = "kept: no positives in this set"
            thresholds[c] = current[c]
            continue
        if name in min_recall:
            policy[c] = f"recall >= {min_recall[name]:g}"
            thresholds[c] = _threshold_for_recall(task, probs, onehot, thresholds, c, min_recall[name])
            if task == "multiclass" and thresholds[c] >= 0.5:  # above 0.5 a class is the argmax anyway
                thresholds[c], policy[c] = 0.5, f"recall >= {min_recall[name]:g}: argmax meets it"
        elif task != "multiclass":
            thresholds[c] = _threshold_max_f1(probs.reshape(len(probs), -1)[:, c], onehot[:, c])
    curves = tradeoff_curves(task, probs, onehot, thresholds)
    chosen = []
    for c in range(n_out):
        p, r, f = _prf(task, probs, onehot, thresholds, c)
        chosen.append({"class": classes[c], "threshold": float(thresholds[c]), "policy": policy[c],
                       "precision": p, "recall": r, "f1": f})
    return {"thresholds": [float(t) for t in thresholds], "before": [float(t) for t in current],
            "chosen": chosen, "curves": curves, "min_recall": dict(min_recall)}


def _threshold_max_f1(scores: np.ndarray, truth: np.ndarray) -> float:
    from sklearn.metrics import precision_recall_curve

    p, r, t = precision_recall_curve(truth, scores)
    f = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0)[:-1]
    return float(t[int(np.argmax(f))])


def _threshold_for_recall(task, probs, onehot, thresholds, c, target) -> float:
    """The highest threshold for class ``c`` whose recall (under ``metrics.decide``) is >= target."""
    scores = probs.reshape(len(probs), -1)[:, c]
    candidates = np.unique(scores[onehot[:, c] == 1])[::-1]   # recall only changes at a positive's score
    if len(candidates) > 400:
        candidates = np.unique(np.quantile(candidates, np.linspace(0, 1, 400)))[::-1]
    for t in candidates:  # recall grows as the threshold falls: the first that meets it is the highest
        trial = thresholds.copy()
        trial[c] = t
        if _prf(task, probs, onehot, trial, c)[1] >= target - 1e-12:
            return float(t)
    return float(max(candidates.min(), 1e-6))


def _prf(task, probs, onehot, thresholds, c) -> tuple[float, float, float]:
    pred = metrics.decide(task, probs, thresholds)
    pred_c = (pred == c) if task == "multiclass" else pred.reshape(len(pred), -1)[:, c].astype(bool)
    truth = onehot[:, c].astype(bool)
    tp = float((pred_c & truth).sum())
    p = tp / pred_c.sum() if pred_c.sum() else 0.0
    r = tp / truth.sum() if truth.sum() else 0.0
    return float(p), float(r), float(2 * p * r / (p + r)) if p + r else 0.0


def tradeoff_curves(task, probs, onehot, thresholds) -> list[dict]:
    """Per class: precision, recall and F1 over a grid of thresholds for that class (the others
    held at theirs), the curves the report draws with the chosen point on them."""
    out = []
    for c in range(onehot.shape[1]):
        rows = []
        for t in GRID:
            trial = np.array(thresholds, dtype=float)
            trial[c] = t
            rows.append(_prf(task, probs, onehot, trial, c))
        p, r, f = (list(map(float, v)) for v in zip(*rows))
        out.append({"threshold": GRID.tolist(), "precision": p, "recall": r, "f1": f})
    return out


def calibrate_segmenter(stats: dict, classes: list[str], min_recall: dict[str, float],
                        current: np.ndarray, current_area: np.ndarray) -> dict:
    """Per class, the pixel threshold and minimum area with the best mean Dice; for classes in
    ``min_recall``, the best Dice among the settings that find at least that share of the sheets
    carrying the class (image-level recall)."""
    cand = stats["candidates"]
    n_c = len(classes)
    thresholds, areas, chosen, surfaces = np.array(current, float), np.array(current_area, int), [], []
    for c, name in enumerate(classes):
        surface = np.zeros((len(cand), len(MIN_AREAS)))
        recall = np.zeros_like(surface)
        for i, t in enumerate(cand):
            for j, a in enumerate(MIN_AREAS):
                tt, aa = thresholds.copy(), areas.copy()
                tt[c], aa[c] = t, a
                dice, _, found = metrics.pair_scores(stats, tt, aa)
                surface[i, j] = dice[:, c].mean()
                present = stats["truth_area"][:, c] > 0
                recall[i, j] = found[present, c].mean() if present.any() else np.nan
        ok = recall >= min_recall[name] - 1e-12 if name in min_recall else np.ones_like(surface, bool)
        if not ok.any():
            ok = recall == np.nanmax(recall)
        masked = np.where(ok, surface, -np.inf)
        i, j = np.unravel_index(int(np.argmax(masked)), masked.shape)
        thresholds[c], areas[c] = cand[i], MIN_AREAS[j]
        chosen.append({"class": name, "threshold": float(cand[i]), "min_area": int(MIN_AREAS[j]),
                       "dice": float(surface[i, j]), "recall": float(recall[i, j]),
                       "policy": f"detection recall >= {min_recall[name]:g}" if name in min_recall else "max Dice"})
        surfaces.append({"dice": surface.tolist(), "recall": recall.tolist()})
    return {"thresholds": [float(t) for t in thresholds], "min_area": [int(a) for a in areas],
            "before": [float(t) for t in current], "min_area_before": [int(a) for a in current_area],
            "chosen": chosen, "surfaces": surfaces, "candidates": cand.tolist(), "min_areas": list(MIN_AREAS),
            "min_recall": dict(min_recall), "classes": n_c}


def write_back(ev: Evaluation) -> str:
    """Store the calibrated thresholds (and minimum areas) in the checkpoint's meta.json, where the
    scoring job reads them; the previous meta.json is kept beside it as meta.before-<time>.json."""
    uri = ev.job.evaluate.checkpoint
    note = {"at": ev.started, "data": ev.cfg.data.root, "split": ev.job.evaluate.split, "images": len(ev.manifest),
            "min_recall": ev.job.evaluate.min_recall, "tta": ev.job.evaluate.tta, "chosen": ev.calibration["chosen"]}
    if "ensemble" in ev.meta:
        return ensemble.write_thresholds(uri, ev.calibration["thresholds"], ev.calibration.get("min_area"), note,
                                         ev.job.s3)
    meta_uri = storage.join(uri, checkpoint.META)
    old = storage.read_text(meta_uri, ev.job.s3)
    stamp = ev.started.replace(":", "").replace("+0000", "Z")
    storage.write_text(storage.join(uri, f"meta.before-{stamp}.json"), old, ev.job.s3)
    meta = json.loads(old)
    meta["thresholds"] = ev.calibration["thresholds"]
    if "min_area" in ev.calibration:
        meta["min_area"] = ev.calibration["min_area"]
    meta["calibration"] = note
    storage.write_text(meta_uri, json.dumps(meta, indent=1), ev.job.s3)
    return meta_uri


def track(ev: Evaluation, written: dict[str, str]):
    """Log the evaluation (metrics.json, report.html, the calibrated thresholds, its figures) to the
    MLflow run that trained the checkpoint, or a run of its own; returns that ``tracking.Run``."""
    from steelray import tracking

    opts = ev.job.evaluate
    label = opts.split + ("" if opts.tta == "none" else f"-{opts.tta}")
    files = {name: storage.read_text(written[name], ev.job.s3) for name in ("metrics.json", "report.html")}
    figures = {k: v for k, v in ev.before.items() if isinstance(v, (int, float))}
    return tracking.log_evaluation(ev.job.tracking, ev.meta, opts.checkpoint, files, figures,
                                   {k: ev.calibration[k] for k in ("thresholds", "min_area") if k in ev.calibration},
                                   label)


def keep_reference(ev: Evaluation) -> str | None:
    """A classifier's probabilities on the evaluated set, kept in its checkpoint (``checkpoint.REFERENCE``)
    (one ``prob_<class>`` column per class, as scoring names them): the night report's reference for
    drift. Segmenters and exported models keep none (returns None)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from steelray.scoring.plan import column_name

    if ev.probs is None or onnx_model.is_exported(ev.job.evaluate.checkpoint):
        return None
    probs = ev.probs.reshape(len(ev.probs), -1).astype(np.float32)
    table = pa.table({f"prob_{column_name(c)}": probs[:, k] for k, c in enumerate(ev.classes)})
    table = table.replace_schema_metadata({"steelray.reference": json.dumps(
        {"at": ev.started, "data": ev.cfg.data.root, "split": ev.job.evaluate.split, "images": len(ev.manifest)})})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    uri = storage.join(ev.job.evaluate.checkpoint, checkpoint.REFERENCE)
    storage.write_bytes(uri, buf.getvalue(), ev.job.s3)
    return uri


# --- robustness ---------------------------------------------------------------------------------

def robustness(model, ev: Evaluation) -> dict:
    """The headline metric (at the calibrated thresholds) under each condition, and its drop."""
    clean = ev.after[ev.metric]
    rows = {}
    for name, what in conditions.CONDITIONS.items():
        log.info("robustness: %s", name)
        if ev.task == "segmentation":
            stats = predict.predict_masks(model, ev.meta, ev.manifest, ev.job, perturb=name)
            value = metrics.segmentation_detail(stats, ev.classes, ev.calibration["thresholds"],
                                                ev.calibration["min_area"])[ev.metric]
        else:
            probs = predict.predict(model, ev.meta, ev.manifest, ev.job, perturb=name)
            value = metrics.classification_detail(ev.task, probs, ev.targets, ev.classes,
                                                  ev.calibration["thresholds"])[ev.metric]
        rows[name] = {"what": what, ev.metric: value, "drop": clean - value}
    gap = abs(rows["glare"][ev.metric] - rows["dim"][ev.metric])
    return {"metric": ev.metric, "clean": clean, "conditions": rows, "bright_dim_gap": gap,
            "target": ROBUSTNESS_TARGET, "met": bool(gap < ROBUSTNESS_TARGET)}


def weaknesses(ev: Evaluation) -> list[str]:
    """Plain sentences for the model card, derived from the numbers (never written by hand)."""
    out = []
    per_class = ev.before["per_class"]
    key = "dice" if ev.task == "segmentation" else "f1"
    worst = sorted(per_class, key=lambda r: r[key])[:2]
    for r in worst:
        if r[key] < 0.9:
            out.append(f"class {r['class']}: {key} {r[key]:.3f} (recall {r['recall']:.3f}, support {r['support']})")
    if ev.task == "multiclass":
        cm = np.array(ev.before["confusion"])
        off = cm - np.diag(np.diag(cm))
        if off.sum():
            i, j = np.unravel_index(int(off.argmax()), off.shape)
            out.append(f"most frequent confusion: {ev.classes[i]} taken for {ev.classes[j]} ({off[i, j]} of "
                       f"{cm[i].sum()} images)")
    for name, row in ev.robustness.get("conditions", {}).items():
        if row["drop"] >= ROBUSTNESS_TARGET:
            out.append(f"{name} ({row['what']}): {ev.metric} drops by {row['drop']:.3f}")
    if ev.robustness and not ev.robustness["met"]:
        out.append(f"bright vs dim gap {ev.robustness['bright_dim_gap']:.3f} is above the {ROBUSTNESS_TARGET} target")
    small = [r["class"] for r in per_class if r["support"] < 30]
    if small:
        out.append(f"few examples in this set for {', '.join(small)} (< 30): their figures are uncertain")
    if ev.job.evaluate.split == "val":
        out.append("evaluated on the training run's own validation split, which also chose the checkpoint "
                   "(and here calibrates the thresholds): expect slightly lower figures on new sheets")
    return out or ["none found on this set"]
