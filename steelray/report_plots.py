"""The evaluation report's plots (matplotlib): one function per plot, each taking the ``Evaluation``
(and the model, for those that look at images) and returning a figure, or None when there is
nothing to show; ``report`` embeds them as PNG."""

from __future__ import annotations

import io
import math

import numpy as np

from steelray import images, metrics, model_io, models, predict


def to_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _grid(n: int, cols: int, size=(3.0, 2.6)):
    import matplotlib.pyplot as plt

    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    return fig, axes.ravel()


# --- classifier plots ---------------------------------------------------------------------------

def plot_confusion(ev):
    """C x C (multiclass, rows true, normalised by row, counts written) or one 2 x 2 per class."""
    from sklearn.metrics import ConfusionMatrixDisplay

    cm = np.array(ev.before["confusion"])
    if ev.task == "multiclass":
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(0.7 * len(ev.classes) + 2.5, 0.6 * len(ev.classes) + 2))
        ConfusionMatrixDisplay(cm, display_labels=ev.classes).plot(ax=ax, cmap="Blues", colorbar=False,
                                                                   xticks_rotation=45)
        ax.set_title("Confusion matrix (rows: true class)")
        return fig
    fig, axes = _grid(len(ev.classes), min(4, len(ev.classes)))
    for ax, name, m in zip(axes, ev.classes, cm):
        ConfusionMatrixDisplay(m, display_labels=["no", "yes"]).plot(ax=ax, cmap="Blues", colorbar=False)
        ax.set_title(f"{name}")
    fig.suptitle("Confusion per class (rows: true)")
    return fig


def _onehot(ev):
    n = len(ev.classes)
    if ev.task == "multiclass":
        return np.eye(n, dtype=int)[ev.targets], ev.probs
    return ev.targets.reshape(len(ev.targets), -1).astype(int), ev.probs.reshape(len(ev.probs), -1)


def plot_roc(ev):
    from sklearn.metrics import RocCurveDisplay

    truth, scores = _onehot(ev)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for c, name in enumerate(ev.classes):
        if 0 < truth[:, c].sum() < len(truth):
            RocCurveDisplay.from_predictions(truth[:, c], scores[:, c], name=name, ax=ax)
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set_title("ROC per class (one vs rest)")
    return fig


def plot_pr(ev):
    from sklearn.metrics import PrecisionRecallDisplay

    truth, scores = _onehot(ev)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for c, name in enumerate(ev.classes):
        if truth[:, c].sum():
            disp = PrecisionRecallDisplay.from_predictions(truth[:, c], scores[:, c], name=name, ax=ax)
            ch = ev.calibration["chosen"][c]
            ax.plot([ch["recall"]], [ch["precision"]], "o", color=disp.line_.get_color(), ms=7, mec="black")
    ax.set_title("Precision-recall per class (dots: chosen thresholds)")
    return fig


def plot_thresholds(ev):
    """Per class: the trade-off as its threshold moves, with the checkpoint's and the chosen point."""
    if ev.task == "segmentation":
        return _plot_segmenter_thresholds(ev)
    curves = ev.calibration["curves"]
    fig, axes = _grid(len(ev.classes), min(3, len(ev.classes)), size=(3.6, 2.8))
    for ax, name, cv, ch, before in zip(axes, ev.classes, curves, ev.calibration["chosen"],
                                        ev.calibration["before"]):
        t = cv["threshold"]
        ax.plot(t, cv["precision"], label="precision")
        ax.plot(t, cv["recall"], label="recall")
        ax.plot(t, cv["f1"], label="F1", lw=2)
        ax.axvline(before, ls=":", c="grey", label="before")
        ax.axvline(ch["threshold"], ls="--", c="black", label="chosen")
        ax.set_title(f"{name}: {ch['policy']}", fontsize=9)
        ax.set_xlabel("threshold")
        ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("Threshold trade-off per class")
    fig.tight_layout()
    return fig


def _plot_segmenter_thresholds(ev):
    cal = ev.calibration
    fig, axes = _grid(len(ev.classes), min(2, len(ev.classes)), size=(4.6, 3.2))
    cand = np.array(cal["candidates"])
    for c, (ax, name) in enumerate(zip(axes, ev.classes)):
        surface = np.array(cal["surfaces"][c]["dice"])
        for j, a in enumerate(cal["min_areas"]):
            if j % 2 == 0 or a == cal["min_area"][c]:
                ax.plot(cand, surface[:, j], label=f"min area {a}", lw=2 if a == cal["min_area"][c] else 1)
        ch = cal["chosen"][c]
        ax.plot([ch["threshold"]], [ch["dice"]], "o", c="black", ms=8)
        ax.set_title(f"class {name}: {ch['policy']}", fontsize=9)
        ax.set_xlabel("pixel threshold")
        ax.set_ylabel("mean Dice")
    axes[0].legend(fontsize=6)
    fig.suptitle("Pixel threshold and minimum area (dot: chosen)")
    fig.tight_layout()
    return fig


def _image(ev, i):
    r = ev.manifest.records.iloc[i]
    img = images.load_image(r.uri, 1, ev.job.s3)[..., 0]
    return r, img


def _gradcam_layer(model):
    """The last convolutional stage: Grad-CAM's usual target."""
    if isinstance(model, models.SimpleCNN):
        return model.stages[-1]
    if hasattr(model, "feature_info"):
        info = model.feature_info
        name = (info.info if hasattr(info, "info") else info)[-1]["module"]
        return model.get_submodule(name)
    convs = [m for m in model.modules() if isinstance(m, __import__("torch").nn.Conv2d)]
    return convs[-1]


def gradcam(model, ev, indices, targets):
    """Grad-CAM heatmaps (captum's LayerGradCam) in [0, 1] at each image's model input size."""
    import torch
    from captum.attr import LayerAttribution, LayerGradCam

    pre = model_io.Preprocess.from_dict(ev.meta["preprocess"])
    ds = predict.EvalImages([ev.manifest.records.uri.iloc[i] for i in indices], pre, None, ev.job.s3)
    x = model_io.model_input(torch.stack([ds[k][0] for k in range(len(ds))]).to(next(model.parameters()).device), pre)
    cam = LayerGradCam(model, _gradcam_layer(model))
    with torch.enable_grad():
        attr = cam.attribute(x.requires_grad_(), target=[int(t) for t in targets], relu_attributions=True)
    attr = LayerAttribution.interpolate(attr, tuple(x.shape[-2:]), interpolate_mode="bilinear")[:, 0]
    attr = attr.detach().cpu().numpy()
    peak = attr.reshape(len(attr), -1).max(axis=1)
    return attr / np.where(peak > 0, peak, 1)[:, None, None]


def plot_gradcam(ev, model):
    """One well-classified sheet per class (its most confident), the heatmap for its true class."""
    truth, scores = _onehot(ev)
    pred = metrics.decide(ev.task, ev.probs, ev.calibration["thresholds"])
    picks, targets = [], []
    for c in range(len(ev.classes)):
        right = (pred == c) & (truth[:, c] == 1) if ev.task == "multiclass" else \
            (pred.reshape(len(pred), -1)[:, c] == 1) & (truth[:, c] == 1)
        if right.any():
            idx = np.flatnonzero(right)
            picks.append(int(idx[np.argmax(scores[idx, c])]))
            targets.append(c)
    if not picks:
        return None
    heat = gradcam(model, ev, picks, targets)
    import cv2

    fig, axes = _grid(len(picks), min(3, len(picks)), size=(3.4, 3.0) if ev.task == "multiclass" else (7, 1.6))
    for ax, i, c, h in zip(axes, picks, targets, heat):
        r, img = _image(ev, i)
        h = cv2.resize(h, (img.shape[1], img.shape[0]))
        ax.imshow(img, cmap="gray")
        ax.imshow(h, cmap="jet", alpha=0.4 * (h > 0.05))
        ax.set_title(f"{r.image_id}\n{ev.classes[c]} p={scores[i, c]:.2f}", fontsize=8)
        ax.axis("off")
    fig.suptitle("Grad-CAM: where the model looks for the class it found")
    fig.tight_layout()
    return fig


def plot_mistakes(ev, model=None, n: int = 8):
    """The most confident mistakes: the highest probability given to a wrong label, or (segmenters)
    the sheets with the lowest Dice."""
    if ev.task == "segmentation":
        dice, _, _ = metrics.pair_scores(ev.stats, ev.calibration["thresholds"], ev.calibration["min_area"])
        worst = np.argsort(dice.mean(axis=1))[:n]
        worst = [i for i in worst if dice[i].mean() < 1]
        return _mask_panels(ev, model, worst, "Lowest-Dice sheets (left: true, right: predicted)") if worst else None
    truth, scores = _onehot(ev)
    pred = metrics.decide(ev.task, ev.probs, ev.calibration["thresholds"])
    wrong = []
    if ev.task == "multiclass":
        for i in np.flatnonzero(pred != ev.targets):
            wrong.append((scores[i, pred[i]], i, f"true {ev.classes[ev.targets[i]]}, said {ev.classes[pred[i]]}"))
    else:
        p = pred.reshape(len(pred), -1)
        for i, c in zip(*np.nonzero(p != truth)):
            conf = scores[i, c] if p[i, c] else 1 - scores[i, c]
            what = "missed" if truth[i, c] else "false alarm"
            wrong.append((conf, i, f"{ev.classes[c]} {what}, p={scores[i, c]:.2f}"))
    if not wrong:
        return None
    wrong = sorted(wrong, key=lambda w: -w[0])[:n]
    square = ev.task == "multiclass"
    fig, axes = _grid(len(wrong), 4 if square else 2, size=(2.8, 3.0) if square else (7, 1.6))
    for ax, (conf, i, what) in zip(axes, wrong):
        r, img = _image(ev, i)
        ax.imshow(img, cmap="gray")
        ax.set_title(f"{r.image_id}\n{what} ({conf:.2f})", fontsize=8)
        ax.axis("off")
    fig.suptitle("Most confident mistakes")
    fig.tight_layout()
    return fig


def plot_masks(ev, model):
    """Predicted against true masks on the sheets with the most true defect area."""
    order = np.argsort(-ev.stats["truth_area"].sum(axis=1))[:4]
    return _mask_panels(ev, model, list(order), "Masks: true (left) and predicted (right)")


def _mask_panels(ev, model, indices, title):
    from steelray import rle

    pre = model_io.Preprocess.from_dict(ev.meta["preprocess"])
    colors = np.array([[1, 0.2, 0.2], [0.2, 1, 0.2], [0.3, 0.5, 1], [1, 0.9, 0.1], [1, 0.3, 1], [0.2, 1, 1]])
    fig, axes = _grid(2 * len(indices), 2, size=(6, 1.3))
    shown = ev.manifest.subset(list(indices))
    for k, h, w, prob in predict.sheet_probabilities(model, ev.meta, shown, ev.job):
        r = shown.records.iloc[k]
        img = images.load_image(r.uri, pre.in_chans, ev.job.s3)
        truth = np.stack([rle.decode(m, (h, w)) for m in r.rles]).astype(bool)
        pred = np.stack(model_io.masks(prob, h, w, ev.calibration["thresholds"], ev.calibration["min_area"]))
        for ax, masks, label in ((axes[2 * k], truth, "true"), (axes[2 * k + 1], pred, "predicted")):
            ax.imshow(img[..., 0], cmap="gray")
            overlay = np.zeros((h, w, 4))
            for c in range(len(masks)):
                overlay[masks[c], :3] = colors[c % len(colors)]
                overlay[masks[c], 3] = 0.45
            ax.imshow(overlay)
            ax.set_title(f"{r.image_id} {label}", fontsize=7)
            ax.axis("off")
    fig.suptitle(title + "; colours: " + ", ".join(f"{c}" for c in ev.classes), fontsize=9)
    fig.tight_layout()
    return fig


def plot_robustness(ev):
    import matplotlib.pyplot as plt

    rob = ev.robustness
    names = ["clean", *rob["conditions"]]
    values = [rob["clean"], *(r[rob["metric"]] for r in rob["conditions"].values())]
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    bars = ax.bar(names, values, color=["#4c72b0"] + ["#dd8452"] * (len(names) - 1))
    for b, v in zip(bars, values):
        ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.3f}", ha="center", fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel(rob["metric"])
    ax.set_title(f"Robustness: bright vs dim gap {rob['bright_dim_gap']:.3f} (target < {rob['target']})")
    return fig


PLOTTERS = {"confusion": plot_confusion, "roc": plot_roc, "pr": plot_pr, "thresholds": plot_thresholds,
            "gradcam": plot_gradcam, "mistakes": plot_mistakes, "masks": plot_masks, "robustness": plot_robustness}

CAPTIONS = {
    "confusion": "Confusion matrix at the checkpoint's thresholds.",
    "roc": "ROC curves, one class against the rest.",
    "pr": "Precision-recall curves; dots mark the calibrated thresholds.",
    "thresholds": "How precision, recall and F1 (Dice for masks) move with each class's threshold; "
                  "dotted: the checkpoint's, dashed or dot: the calibrated one.",
    "gradcam": "Grad-CAM over one confidently right image per class.",
    "masks": "Predicted against true masks at the calibrated thresholds.",
    "mistakes": "The most confident mistakes at the calibrated thresholds.",
    "robustness": "The headline metric on the same images under glare, dimming, under-exposure, blur and noise.",
}


# --- HTML ---------------------------------------------------------------------------------------
