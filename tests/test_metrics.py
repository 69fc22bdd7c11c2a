import numpy as np
import pytest

from steelray import metrics


def test_kaggle_dice_hand_cases():
    truth = np.zeros((2, 2, 4, 4), bool)
    pred = np.zeros_like(truth)
    assert metrics.mean_dice(pred, truth) == 1.0            # empty on empty scores 1
    truth[0, 0, :2, :2] = True                              # 4 pixels
    pred[0, 0, :2, :1] = True                               # 2 of them
    # pair (0,0): 2*2/(2+4) = 2/3; the other three pairs are empty-empty = 1
    assert metrics.mean_dice(pred, truth) == pytest.approx((2 / 3 + 3) / 4)
    pred[1, 1, 0, 0] = True                                 # a false positive on an empty mask scores 0
    assert metrics.dice_per_pair(pred, truth)[1, 1] == 0.0


def test_classification_hand_cases():
    m = metrics.classification("multiclass", np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), np.array([0, 1, 1]))
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert m["roc_auc"] == pytest.approx(1.0)
    b = metrics.classification("binary", np.array([0.9, 0.4, 0.6, 0.1]), np.array([1, 1, 0, 0]))
    assert b["accuracy"] == 0.5 and b["macro_f1"] == 0.5 and b["roc_auc"] == 0.75


def test_macro_auc_skips_classes_without_both_outcomes():
    scores = np.array([[0.9, 0.2], [0.1, 0.3], [0.8, 0.1]])
    targets = np.array([[1, 0], [0, 0], [1, 0]])          # class 2 never occurs here
    assert metrics.classification("multilabel", scores, targets)["roc_auc"] == 1.0
    assert np.isnan(metrics.classification("multilabel", scores, np.zeros((3, 2), int))["roc_auc"])
