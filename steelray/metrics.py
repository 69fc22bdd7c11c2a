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
