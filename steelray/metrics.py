"""Validation metrics as pure functions: scikit-learn for the standard classification ones,
Kaggle's mean Dice for masks (written here: it is Kaggle's own definition, not a library's)."""

from __future__ import annotations

import numpy as np


def classification(task: str, scores: np.ndarray, targets: np.ndarray, thresholds: np.ndarray | None = None) -> dict:
    """accuracy, macro-F1 and ROC-AUC (macro over the classes where both outcomes occur).

    scores: binary (N,) or multilabel (N, C) probabilities, multiclass (N, C) probabilities.
    targets: binary (N,), multilabel (N, C) 0/1, multiclass (N,) class index.
    """
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    if task == "multiclass":
        pred = scores.argmax(axis=1)
        out = {"accuracy": accuracy_score(targets, pred),
               "macro_f1": f1_score(targets, pred, average="macro", labels=np.arange(scores.shape[1]), zero_division=0)}
        try:
            if scores.shape[1] == 2:  # sklearn wants the positive column alone for two classes
                out["roc_auc"] = roc_auc_score(targets, scores[:, 1])
            else:
                out["roc_auc"] = roc_auc_score(targets, scores, multi_class="ovr", average="macro",
                                               labels=np.arange(scores.shape[1]))
        except ValueError:
            out["roc_auc"] = float("nan")
        return {k: float(v) for k, v in out.items()}
    t = 0.5 if thresholds is None else thresholds
    pred = (scores >= t).astype(int)
    out = {"accuracy": accuracy_score(targets, pred),  # multilabel: exact match of the label set
           "macro_f1": f1_score(targets, pred, average="macro" if task == "multilabel" else "binary", zero_division=0)}
    out["roc_auc"] = _macro_auc(scores.reshape(len(scores), -1), targets.reshape(len(targets), -1))
    return {k: float(v) for k, v in out.items()}


def _macro_auc(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean ROC-AUC over the columns where both outcomes occur (small validation sets often lack a
    rare class); NaN only when no column has both."""
    from sklearn.metrics import roc_auc_score

    defined = [roc_auc_score(targets[:, c], scores[:, c]) for c in range(targets.shape[1])
               if 0 < targets[:, c].sum() < len(targets)]
    return float(np.mean(defined)) if defined else float("nan")


def dice_per_pair(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Kaggle's Dice for every (image, class) pair of boolean (N, C, H, W) masks; an empty
    prediction on an empty mask scores 1."""
    pred, truth = pred.astype(bool), truth.astype(bool)
    inter = (pred & truth).sum(axis=(2, 3))
    total = pred.sum(axis=(2, 3)) + truth.sum(axis=(2, 3))
    return np.where(total == 0, 1.0, 2 * inter / np.maximum(total, 1))


def mean_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Kaggle's score: the mean of Dice over all image-class pairs."""
    return float(dice_per_pair(pred, truth).mean())


# --- decisions and the full evaluation metrics ---------------------------------------------------

def decide(task: str, probs: np.ndarray, thresholds) -> np.ndarray:
    """Labels from probabilities, the one rule that evaluation calibrates and scoring applies.

    binary (N,) and multilabel (N, C): 0/1 where the probability reaches the class's threshold.
    multiclass (N,): among the classes whose probability reaches their threshold, the one with the
    largest probability/threshold; argmax when none does. With every threshold at 0.5 this is the
    argmax; a lower threshold for one class (e.g. cracks) makes that class win more often.
    """
    t = np.asarray(thresholds, dtype=float)
    if task != "multiclass":
        return (probs.reshape(len(probs), -1) >= t).astype(int).reshape(probs.shape)
    ratio = probs / t
    reached = probs >= t
    return np.where(reached.any(axis=1), np.where(reached, ratio, -np.inf).argmax(axis=1), probs.argmax(axis=1))


def classification_detail(task: str, probs: np.ndarray, targets: np.ndarray, classes: list[str],
                          thresholds) -> dict:
    """Everything a report shows for a classifier, from scikit-learn: accuracy, macro/micro F1,
    per-class precision/recall/F1/support, ROC-AUC and PR-AUC (macro and micro, and per class),
    the confusion matrix (C x C for multiclass; one 2 x 2 per class otherwise).

    Binary is treated as one class ``classes[0]`` (the defect), probs and targets (N,)."""
    from sklearn.metrics import (accuracy_score, average_precision_score, confusion_matrix, f1_score,
                                 multilabel_confusion_matrix, roc_auc_score)

    pred = decide(task, probs, thresholds)
    if task == "multiclass":
        n = probs.shape[1]
        onehot_t, onehot_p, scores = np.eye(n, dtype=int)[targets], np.eye(n, dtype=int)[pred], probs
        confusion = confusion_matrix(targets, pred, labels=np.arange(n))
    else:
        onehot_t = targets.reshape(len(targets), -1).astype(int)
        onehot_p = pred.reshape(len(pred), -1)
        scores = probs.reshape(len(probs), -1)
        confusion = (multilabel_confusion_matrix(onehot_t, onehot_p) if task == "multilabel"  # [[tn, fp], [fn, tp]]
                     else confusion_matrix(onehot_t[:, 0], onehot_p[:, 0], labels=[0, 1])[None])
    p, r, f, s = per_column_prf(onehot_t, onehot_p)
    has_both = [c for c in range(onehot_t.shape[1]) if 0 < onehot_t[:, c].sum() < len(onehot_t)]
    per_class_auc = {c: roc_auc_score(onehot_t[:, c], scores[:, c]) for c in has_both}
    per_class_ap = {c: average_precision_score(onehot_t[:, c], scores[:, c]) for c in has_both}
    out = {
        "accuracy": accuracy_score(targets, pred) if task == "multiclass" else accuracy_score(onehot_t, onehot_p),
        "macro_f1": f1_score(onehot_t, onehot_p, average="macro", zero_division=0) if task != "binary" else f[0],
        "micro_f1": f1_score(onehot_t, onehot_p, average="micro", zero_division=0) if task != "binary" else f[0],
        "roc_auc_macro": np.mean(list(per_class_auc.values())) if per_class_auc else np.nan,
        "pr_auc_macro": np.mean(list(per_class_ap.values())) if per_class_ap else np.nan,
        "roc_auc_micro": roc_auc_score(onehot_t[:, has_both].ravel(), scores[:, has_both].ravel())
        if has_both else np.nan,
        "pr_auc_micro": average_precision_score(onehot_t.ravel(), scores.ravel()) if onehot_t.any() else np.nan,
    }
    out = {k: float(v) for k, v in out.items()}
    out["per_class"] = [{"class": classes[c], "precision": float(p[c]), "recall": float(r[c]), "f1": float(f[c]),
                         "support": int(s[c]), "roc_auc": float(per_class_auc.get(c, np.nan)),
                         "pr_auc": float(per_class_ap.get(c, np.nan)), "threshold": float(np.atleast_1d(thresholds)[c])}
                        for c in range(onehot_t.shape[1])]
    out["confusion"] = confusion.tolist()
    return out


def per_column_prf(truth: np.ndarray, pred: np.ndarray):
    """Precision, recall, F1 and support of each column of 0/1 (N, C) arrays, one column at a time
    (scikit-learn reads a lone (N, 1) column as binary labels rather than as indicators)."""
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, _ = (np.array(v) for v in zip(*(
        precision_recall_fscore_support(truth[:, c], pred[:, c], average="binary", zero_division=0)
        for c in range(truth.shape[1]))))
    return p, r, f, truth.sum(axis=0)


def segmentation_detail(stats: dict, classes: list[str], thresholds, min_area) -> dict:
    """Kaggle mean Dice over image-class pairs (empty-empty = 1), per-class Dice and IoU, and
    image-level defect detection (a class is found on a sheet when its mask is not empty) from
    per-pair statistics at the chosen pixel threshold and minimum area (see ``mask_stats``)."""
    from sklearn.metrics import roc_auc_score

    dice, iou, found = pair_scores(stats, thresholds, min_area)
    present = stats["truth_area"] > 0
    p, r, f, s = per_column_prf(present.astype(int), found.astype(int))
    per_class = []
    for c, name in enumerate(classes):
        both = 0 < present[:, c].sum() < len(present)
        per_class.append({"class": name, "dice": float(dice[:, c].mean()), "iou": float(iou[:, c].mean()),
                          "precision": float(p[c]), "recall": float(r[c]), "f1": float(f[c]), "support": int(s[c]),
                          "roc_auc": float(roc_auc_score(present[:, c], stats["peak"][:, c])) if both else float("nan"),
                          "threshold": float(np.atleast_1d(thresholds)[c]), "min_area": int(np.atleast_1d(min_area)[c])})
    return {"dice": float(dice.mean()), "iou": float(iou.mean()),
            "detection_macro_f1": float(np.mean(f)), "per_class": per_class}


def mask_stats(prob: np.ndarray, truth: np.ndarray, candidates: np.ndarray) -> dict:
    """Per class, for every candidate pixel threshold: predicted area and overlap with the true mask,
    from one image's (C, H, W) probabilities and boolean truth; plus the true area and peak
    probability. Enough to score any (threshold, minimum area) later without keeping the maps."""
    above = prob[None] >= candidates[:, None, None, None]          # (T, C, H, W)
    return {"pred_area": above.sum(axis=(2, 3)).T, "inter": (above & truth[None]).sum(axis=(2, 3)).T,
            "truth_area": truth.sum(axis=(1, 2)), "peak": prob.reshape(len(prob), -1).max(axis=1)}


def pair_scores(stats: dict, thresholds, min_area):
    """(dice, iou, found) per (image, class) at the given per-class threshold and minimum area.
    ``stats`` stacks ``mask_stats`` over images: pred_area/inter (N, C, T), truth_area/peak (N, C),
    candidates (T,)."""
    cand = np.asarray(stats["candidates"])
    idx = np.array([int(np.argmin(np.abs(cand - t))) for t in np.atleast_1d(thresholds)])
    n, c = stats["truth_area"].shape
    pred = stats["pred_area"][np.arange(n)[:, None], np.arange(c)[None, :], idx[None, :]]
    inter = stats["inter"][np.arange(n)[:, None], np.arange(c)[None, :], idx[None, :]]
    found = pred >= np.maximum(np.asarray(min_area), 1)
    pred, inter = np.where(found, pred, 0), np.where(found, inter, 0)
    truth = stats["truth_area"]
    total = pred + truth
    dice = np.where(total == 0, 1.0, 2 * inter / np.maximum(total, 1))
    union = total - inter
    iou = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
    return dice, iou, found
