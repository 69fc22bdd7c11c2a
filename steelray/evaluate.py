"""Evaluation of one checkpoint on a labelled set: metrics, calibrated thresholds, robustness.

    ev = evaluate.run(evaluate.Options(checkpoint="runs/neu/epoch-0069", data_root="/data/neu-det"))

The model is loaded as a plain ``nn.Module`` (no Ray) and applied to every image of the set (the
training run's validation split by default, rebuilt from the config stored in the checkpoint);
probabilities are kept, so thresholds can be calibrated and metrics recomputed at any threshold
without another pass. Segmenters keep, per image and class, the predicted area and overlap at a set
of candidate pixel thresholds (at the sheet's own size, as scoring computes masks), enough for
Kaggle's Dice at any threshold and minimum area. Robustness re-runs the set under glare, dimming,
under-exposure, blur and noise. ``report.write`` turns the result into ``report.html`` and ``metrics.json``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from steelray import checkpoint, config, data, metrics, models, presets, rle, storage
from steelray.config import S3Config

log = logging.getLogger(__name__)

PIXEL_THRESHOLDS = np.round(np.arange(0.1, 0.95, 0.05), 2)     # segmenter calibration candidates
MIN_AREAS = (0, 100, 200, 400, 800, 1600, 3200, 6400, 12800)    # pixels at the sheet's own size
GRID = np.round(np.linspace(0.01, 0.99, 99), 2)                  # trade-off curves
ROBUSTNESS_TARGET = 0.03  # the field's bright-vs-dim macro-F1 gap is 0.06; ours should stay under this


class EvaluationError(ValueError):
    """The checkpoint, the data or an option cannot be evaluated as given."""


@dataclass
class Options:
    checkpoint: str
    data_root: str = ""                  # empty: the training data root stored in the checkpoint
    split: str = "val"                   # val: the training run's validation split; all: every image
    data_overrides: list[str] = field(default_factory=list)  # data.key=value for the labelled set
    min_recall: dict[str, float] = field(default_factory=dict)  # class -> recall the thresholds must keep
    robustness: bool = True
    device: str = "auto"
    batch_size: int = 32
    loader_workers: int = 0
    limit: int = 0                       # > 0: first N images (quick looks)
    s3: S3Config = field(default_factory=S3Config)


@dataclass
class Evaluation:
    """Everything the report shows; ``summary()`` is the JSON-ready part."""

    options: Options
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

    def summary(self) -> dict:
        counts = self.manifest.class_counts()
        return {
            "checkpoint": self.options.checkpoint, "model": self.meta.get("model", {}), "task": self.task,
            "classes": self.classes, "evaluated_at": self.started, "epoch": self.meta.get("epoch"),
            "data": {"root": self.cfg.data.root, "format": self.cfg.data.format, "split": self.options.split,
                     "images": len(self.manifest), "class_counts": counts},
            "metric": self.metric, "metrics": self.before, "metrics_calibrated": self.after,
            "calibration": self.calibration, "robustness": self.robustness,
            "training_metrics": self.meta.get("metrics", {}), "weaknesses": weaknesses(self),
        }


def run(opts: Options) -> Evaluation:
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    meta = checkpoint.read_meta(opts.checkpoint, opts.s3)
    cfg = labelled_set_config(meta, opts)
    manifest = select(data.build_manifest(cfg), cfg, opts)
    task = meta["task"]
    classes = ["defect"] if task == "binary" else list(meta["classes"])
    if list(manifest.classes) != list(meta["classes"]):
        raise EvaluationError(f"{cfg.data.root}: classes {manifest.classes} differ from the checkpoint's "
                              f"{meta['classes']}")
    unknown = sorted(set(opts.min_recall) - set(classes))
    if unknown:
        raise EvaluationError(f"min recall for {', '.join(unknown)}: not a class of this model; classes: "
                              f"{', '.join(classes)}")
    bad = {c: r for c, r in opts.min_recall.items() if not 0 < r <= 1}
    if bad:
        raise EvaluationError(f"min recall must be in (0, 1], got {bad}")
    model, _ = checkpoint.load_model(opts.checkpoint, opts.s3, device=device_of(opts))
    thresholds = np.asarray(meta["thresholds"], dtype=float)
    log.info("evaluating %s on %d images (%s)", opts.checkpoint, len(manifest), manifest.summary())
    if task == "segmentation":
        min_area = np.asarray(meta.get("min_area") or [0] * len(classes))
        stats = predict_masks(model, meta, manifest, opts)
        before = metrics.segmentation_detail(stats, classes, thresholds, min_area)
        calibration = calibrate_segmenter(stats, classes, opts.min_recall, thresholds, min_area)
        after = metrics.segmentation_detail(stats, classes, calibration["thresholds"], calibration["min_area"])
        probs = targets = None
    else:
        targets = manifest.targets(task)
        probs = predict(model, meta, manifest, opts)
        before = metrics.classification_detail(task, probs, targets, classes, thresholds)
        calibration = calibrate_classifier(task, probs, targets, classes, opts.min_recall, thresholds)
        after = metrics.classification_detail(task, probs, targets, classes, calibration["thresholds"])
        stats = None
    ev = Evaluation(opts, meta, cfg, classes, manifest, probs, targets, stats, before, after, calibration, {}, started)
    if opts.robustness:
        ev.robustness = robustness(model, ev)
    return ev


def labelled_set_config(meta: dict, opts: Options) -> config.Config:
    """The checkpoint's own training config with the labelled set's root and overrides."""
    raw = meta["config"]
    raw = {k: v for k, v in raw.items() if k in {f.name for f in config.dataclasses.fields(config.Config)}}
    cfg = config.from_dict(raw)
    overrides = list(opts.data_overrides)
    if opts.data_root:
        overrides.append(f"data.root={opts.data_root}")
    if opts.split == "all" or opts.data_root:
        overrides.append("data.limit=0")
    for item in overrides:
        if not item.startswith("data."):
            raise EvaluationError(f"{item}: only data.* settings describe the labelled set")
    cfg_raw = config.to_dict(cfg, redact=False)
    cfg_raw["s3"] = config.to_dict(opts.s3, redact=False)
    for item in overrides:
        config._apply_override(cfg_raw, item)
    return config.from_dict(cfg_raw)


def select(manifest: data.Manifest, cfg: config.Config, opts: Options) -> data.Manifest:
    if opts.split not in ("val", "all"):
        raise EvaluationError(f"split: {opts.split!r} is not one of val, all")
    if opts.split == "val":
        _, manifest = data.split(manifest, cfg.data)
    if opts.limit:
        manifest = manifest.subset(np.arange(min(opts.limit, len(manifest))))
    if not len(manifest):
        raise EvaluationError(f"{cfg.data.root}: no images to evaluate ({opts.split} split)")
    return manifest


def device_of(opts: Options) -> str:
    if opts.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return opts.device


# --- applying the model -------------------------------------------------------------------------

class _Images(Dataset):
    """Images by URI, optionally perturbed (robustness), then the checkpoint's own preprocessing."""

    def __init__(self, uris, in_chans, transform, perturb=None, s3=None):
        self.uris, self.in_chans, self.transform, self.perturb, self.s3 = uris, in_chans, transform, perturb, s3

    def __len__(self):
        return len(self.uris)

    def __getitem__(self, i):
        image = data.load_image(self.uris[i], self.in_chans, self.s3)
        h, w = image.shape[:2]
        if self.perturb is not None:
            image = perturb_image(image, self.perturb, seed=i)
        return presets.to_chw(self.transform(image=image)["image"]), i, h, w


def _batches(meta: dict, manifest: data.Manifest, opts: Options, perturb: str | None):
    pre = models.Preprocess.from_dict(meta["preprocess"])
    ds = _Images(list(manifest.records.uri), pre.in_chans, presets.build(pre), perturb, opts.s3)
    return DataLoader(ds, batch_size=opts.batch_size, num_workers=opts.loader_workers)


@torch.no_grad()
def predict(model, meta: dict, manifest: data.Manifest, opts: Options, perturb: str | None = None) -> np.ndarray:
    """Probabilities: (N,) binary, (N, C) multilabel (sigmoid) or multiclass (softmax)."""
    device = next(model.parameters()).device
    out = []
    for x, _, _, _ in _batches(meta, manifest, opts, perturb):
        logits = model(x.to(device).contiguous(memory_format=torch.channels_last)).float()
        out.append((torch.softmax(logits, 1) if meta["task"] == "multiclass" else torch.sigmoid(logits)).cpu().numpy())
    probs = np.concatenate(out)
    return probs[:, 0] if meta["task"] == "binary" else probs


@torch.no_grad()
def predict_masks(model, meta: dict, manifest: data.Manifest, opts: Options, perturb: str | None = None) -> dict:
    """Per (image, class): areas and overlaps at every candidate threshold, at the image's own size."""
    device = next(model.parameters()).device
    rles = list(manifest.records.rles)
    parts = []
    for x, idx, hs, ws in _batches(meta, manifest, opts, perturb):
        probs = torch.sigmoid(model(x.to(device).contiguous(memory_format=torch.channels_last)).float())
        for j, i in enumerate(idx.tolist()):
            h, w = int(hs[j]), int(ws[j])
            full = torch.nn.functional.interpolate(probs[j:j + 1], size=(h, w), mode="bilinear",
                                                   align_corners=False)[0].cpu().numpy()
            truth = np.stack([rle.decode(r, (h, w)) for r in rles[i]]).astype(bool)
            parts.append(metrics.mask_stats(full, truth, PIXEL_THRESHOLDS))
    stats = {k: np.stack([p[k] for p in parts]) for k in parts[0]}
    stats["candidates"] = PIXEL_THRESHOLDS
    return stats


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
    uri = ev.options.checkpoint
    meta_uri = storage.join(uri, checkpoint.META)
    old = storage.read_text(meta_uri, ev.options.s3)
    stamp = ev.started.replace(":", "").replace("+0000", "Z")
    storage.write_text(storage.join(uri, f"meta.before-{stamp}.json"), old, ev.options.s3)
    meta = json.loads(old)
    meta["thresholds"] = ev.calibration["thresholds"]
    if "min_area" in ev.calibration:
        meta["min_area"] = ev.calibration["min_area"]
    meta["calibration"] = {"at": ev.started, "data": ev.cfg.data.root, "split": ev.options.split,
                           "images": len(ev.manifest), "min_recall": ev.options.min_recall,
                           "chosen": ev.calibration["chosen"]}
    storage.write_text(meta_uri, json.dumps(meta, indent=1), ev.options.s3)
    return meta_uri


# --- robustness ---------------------------------------------------------------------------------

# glare adds stray light (an offset) and washes out contrast; dimming is less light, which scales every
# pixel down (darker, and its contrast falls with it). "crushed" is a darker exposure than any plant
# camera should run at: -30% of full scale with contrast -30% sends every pixel below 43% grey to
# black (12-82% of a NEU image), erasing dark defects; it is reported, not part of the gap.
CONDITIONS = {
    "glare": "stray light: +30% of full scale, contrast -30%",
    "dim": "30% less light: every pixel x0.7",
    "crushed": "under-exposed: -30% of full scale, contrast -30% (pixels below 43% grey clip to black)",
    "blur": "Gaussian blur, sigma 2 px",
    "noise": "Gaussian noise, sigma 8% of full scale",
}


def perturb_image(image: np.ndarray, condition: str, seed: int = 0) -> np.ndarray:
    """One of ``CONDITIONS`` applied to a uint8 HxWxC image, deterministically (albumentations)."""
    import albumentations as A

    if condition == "glare":
        t = A.RandomBrightnessContrast(brightness_limit=(0.3, 0.3), contrast_limit=(-0.3, -0.3), p=1)
    elif condition == "dim":
        t = A.MultiplicativeNoise(multiplier=(0.7, 0.7), per_channel=False, elementwise=False, p=1)
    elif condition == "crushed":
        t = A.RandomBrightnessContrast(brightness_limit=(-0.3, -0.3), contrast_limit=(-0.3, -0.3), p=1)
    elif condition == "blur":
        t = A.GaussianBlur(blur_limit=(0, 0), sigma_limit=(2.0, 2.0), p=1)
    elif condition == "noise":
        t = A.GaussNoise(std_range=(0.08, 0.08), p=1)
    else:
        raise EvaluationError(f"unknown condition {condition!r}; choose one of {', '.join(CONDITIONS)}")
    return A.Compose([t], seed=seed)(image=image)["image"]


def robustness(model, ev: Evaluation) -> dict:
    """The headline metric (at the calibrated thresholds) under each condition, and its drop."""
    clean = ev.after[ev.metric]
    rows = {}
    for name, what in CONDITIONS.items():
        log.info("robustness: %s", name)
        if ev.task == "segmentation":
            stats = predict_masks(model, ev.meta, ev.manifest, ev.options, perturb=name)
            value = metrics.segmentation_detail(stats, ev.classes, ev.calibration["thresholds"],
                                                ev.calibration["min_area"])[ev.metric]
        else:
            probs = predict(model, ev.meta, ev.manifest, ev.options, perturb=name)
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
    if ev.options.split == "val":
        out.append("evaluated on the training run's own validation split, which also chose the checkpoint "
                   "(and here calibrates the thresholds): expect slightly lower figures on new sheets")
    return out or ["none found on this set"]
