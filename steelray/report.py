"""The evaluation report: PNG plots (matplotlib), one self-contained ``report.html`` (jinja2, the
PNGs embedded), and ``metrics.json``, written to a local folder or an s3:// prefix.

    ev = evaluate.run(opts); report.write(ev, "reports/neu-epoch-0069")
"""

from __future__ import annotations

import base64
import io
import json
import math

import numpy as np

from steelray import data, evaluate, metrics, models, storage

PLOTS_CLASSIFIER = ("confusion", "roc", "pr", "thresholds", "gradcam", "mistakes", "robustness")
PLOTS_SEGMENTER = ("thresholds", "masks", "mistakes", "robustness")


def write(ev: evaluate.Evaluation, out: str) -> dict:
    """Write plots, report.html and metrics.json into ``out``; returns {name: uri}."""
    import matplotlib

    matplotlib.use("Agg")
    model = None
    pngs = {}
    for name in (PLOTS_SEGMENTER if ev.task == "segmentation" else PLOTS_CLASSIFIER):
        if name == "robustness" and not ev.robustness:
            continue
        if name in ("gradcam", "masks", "mistakes") and model is None:
            from steelray import checkpoint

            model, _ = checkpoint.load_model(ev.options.checkpoint, ev.options.s3, evaluate.device_of(ev.options))
        fig = PLOTTERS[name](ev, model) if name in ("gradcam", "masks", "mistakes") else PLOTTERS[name](ev)
        if fig is None:
            continue
        pngs[name] = _png(fig)
    summary = ev.summary()
    summary["calibration"] = {k: v for k, v in summary["calibration"].items() if k not in ("curves", "surfaces")}
    summary["images"] = [f"{n}.png" for n in pngs]
    written = {}
    for name, png in pngs.items():
        written[name] = storage.join(out, f"{name}.png")
        storage.write_bytes(written[name], png, ev.options.s3)
    written["metrics.json"] = storage.join(out, "metrics.json")
    storage.write_text(written["metrics.json"], json.dumps(_jsonable(summary), indent=1), ev.options.s3)
    written["report.html"] = storage.join(out, "report.html")
    storage.write_text(written["report.html"], render(ev, summary, pngs), ev.options.s3)
    return written


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


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
    img = data.load_image(r.uri, 1, ev.options.s3)[..., 0]
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

    pre = models.Preprocess.from_dict(ev.meta["preprocess"])
    ds = evaluate._Images([ev.manifest.records.uri.iloc[i] for i in indices], pre.in_chans,
                          __import__("steelray.presets", fromlist=["build"]).build(pre), None, ev.options.s3)
    x = torch.stack([torch.from_numpy(ds[k][0]) for k in range(len(ds))]).to(next(model.parameters()).device)
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
    import torch

    from steelray import presets, rle

    pre = models.Preprocess.from_dict(ev.meta["preprocess"])
    transform = presets.build(pre)
    colors = np.array([[1, 0.2, 0.2], [0.2, 1, 0.2], [0.3, 0.5, 1], [1, 0.9, 0.1], [1, 0.3, 1], [0.2, 1, 1]])
    fig, axes = _grid(2 * len(indices), 2, size=(6, 1.3))
    for k, i in enumerate(indices):
        r = ev.manifest.records.iloc[i]
        img = data.load_image(r.uri, pre.in_chans, ev.options.s3)
        h, w = img.shape[:2]
        x = torch.from_numpy(presets.to_chw(transform(image=img)["image"]))[None].to(next(model.parameters()).device)
        with torch.no_grad():
            prob = torch.sigmoid(model(x).float())
            prob = torch.nn.functional.interpolate(prob, size=(h, w), mode="bilinear", align_corners=False)[0]
        prob = prob.cpu().numpy()
        truth = np.stack([rle.decode(m, (h, w)) for m in r.rles]).astype(bool)
        pred = prob >= np.array(ev.calibration["thresholds"])[:, None, None]
        for c in range(len(pred)):
            if pred[c].sum() < ev.calibration["min_area"][c]:
                pred[c] = False
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

TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>steelray evaluation: {{ s.model.name }} {{ s.task }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5rem; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .5rem 0; font-size: .9rem; }
th, td { border: 1px solid #ddd; padding: .25rem .6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
table.card td, td.text { text-align: left; }
.headline { display: flex; gap: 1rem; flex-wrap: wrap; }
.headline div { background: #f3f5f8; padding: .6rem 1rem; border-radius: 6px; }
.headline b { display: block; font-size: 1.4rem; }
.bad { color: #b00020; } .good { color: #006400; }
figure { margin: 1rem 0; } figure img { max-width: 100%; } figcaption { color: #555; font-size: .85rem; }
</style>
</head>
<body>
<h1>Evaluation of {{ s.model.name }} ({{ s.task }})</h1>
<p>Checkpoint <code>{{ s.checkpoint }}</code> (epoch {{ s.epoch }}), evaluated {{ s.evaluated_at }} on
{{ s.data.images }} images of <code>{{ s.data.root }}</code> ({{ s.data.format }}, {{ s.data.split }} split).</p>

<div class="headline">
{% for k, v in headline %}<div>{{ k }}<b>{{ v }}</b></div>{% endfor %}
</div>

<h2>Model card</h2>
<table class="card">
<tr><th>task</th><td>{{ s.task }}: {{ s.classes | join(", ") }}</td></tr>
<tr><th>model</th><td>{{ s.model.name }}{% if s.task == "segmentation" %} ({{ s.model.arch }}){% endif %}, input {{ preprocess.size | join("x") }}, {{ preprocess.in_chans }} channel(s), {% if preprocess.normalize == "image" %}each image normalised to its own mean and std{% else %}fixed mean/std normalisation{% endif %}</td></tr>
<tr><th>training data</th><td>{{ train_cfg.data.format }} at <code>{{ train_cfg.data.root }}</code>, validation fraction {{ train_cfg.data.val_fraction }}, seed {{ train_cfg.data.seed }}</td></tr>
<tr><th>training</th><td>{{ train_cfg.train.epochs }} epochs, batch {{ train_cfg.train.batch_size }} x {{ train_cfg.ray.num_workers }} workers, lr {{ train_cfg.train.lr }}, {{ train_cfg.train.scheduler }} schedule, augmentation {{ train_cfg.input.augment }}, label smoothing {{ train_cfg.train.label_smoothing }}</td></tr>
<tr><th>evaluation set</th><td>{% for c, n in s.data.class_counts.items() %}{{ c }}: {{ n }}{% if not loop.last %}, {% endif %}{% endfor %}</td></tr>
<tr><th>thresholds</th><td>{% for ch in s.calibration.chosen %}{{ ch["class"] }} {{ "%.3f" | format(ch.threshold) }}{% if ch.min_area is defined %} / area {{ ch.min_area }}{% endif %} ({{ ch.policy }}){% if not loop.last %}; {% endif %}{% endfor %}</td></tr>
<tr><th>known weaknesses</th><td><ul>{% for w in s.weaknesses %}<li>{{ w }}</li>{% endfor %}</ul></td></tr>
</table>

<h2>Metrics</h2>
<p>At the checkpoint's thresholds, and (in-sample, so optimistic) at the calibrated ones.</p>
<table>
<tr><th>metric</th><th>checkpoint thresholds</th><th>calibrated</th></tr>
{% for k in overall %}<tr><td>{{ k }}</td><td>{{ fmt(s.metrics[k]) }}</td><td>{{ fmt(s.metrics_calibrated[k]) }}</td></tr>
{% endfor %}
</table>
<h3>Per class (checkpoint thresholds)</h3>
<table>
<tr>{% for col in per_class_cols %}<th>{{ col }}</th>{% endfor %}</tr>
{% for row in s.metrics.per_class %}<tr>{% for col in per_class_cols %}<td>{{ fmt(row[col]) }}</td>{% endfor %}</tr>
{% endfor %}
</table>

<h2>Thresholds</h2>
<p>Calibrated on this set: {% if s.calibration.min_recall %}minimum recall {% for c, r in s.calibration.min_recall.items() %}{{ c }} &ge; {{ r }}{% if not loop.last %}, {% endif %}{% endfor %}; other classes {% endif %}{{ "best Dice per class" if s.task == "segmentation" else ("argmax" if s.task == "multiclass" else "best F1 per class") }}.</p>
<table>
<tr><th>class</th><th>before</th><th>chosen</th><th>policy</th>{% if s.task == "segmentation" %}<th>min area before</th><th>min area</th><th>Dice</th><th>detection recall</th>{% else %}<th>precision</th><th>recall</th><th>F1</th>{% endif %}</tr>
{% for ch in s.calibration.chosen %}<tr><td>{{ ch["class"] }}</td><td>{{ fmt(s.calibration.before[loop.index0]) }}</td><td>{{ fmt(ch.threshold) }}</td><td class="text">{{ ch.policy }}</td>
{% if s.task == "segmentation" %}<td>{{ s.calibration.min_area_before[loop.index0] }}</td><td>{{ ch.min_area }}</td><td>{{ fmt(ch.dice) }}</td><td>{{ fmt(ch.recall) }}</td>{% else %}<td>{{ fmt(ch.precision) }}</td><td>{{ fmt(ch.recall) }}</td><td>{{ fmt(ch.f1) }}</td>{% endif %}</tr>
{% endfor %}
</table>

{% if s.robustness %}
<h2>Robustness</h2>
<p>{{ s.robustness.metric }} on the same images, calibrated thresholds. Bright vs dim gap
<b class="{{ 'good' if s.robustness.met else 'bad' }}">{{ fmt(s.robustness.bright_dim_gap) }}</b>
(target under {{ s.robustness.target }}; the field reports 0.06).</p>
<table>
<tr><th>condition</th><th>what</th><th>{{ s.robustness.metric }}</th><th>drop</th></tr>
<tr><td>clean</td><td></td><td>{{ fmt(s.robustness.clean) }}</td><td></td></tr>
{% for name, r in s.robustness.conditions.items() %}<tr><td>{{ name }}</td><td class="text">{{ r.what }}</td><td>{{ fmt(r[s.robustness.metric]) }}</td><td>{{ fmt(r.drop) }}</td></tr>
{% endfor %}
</table>
{% endif %}

<h2>Plots</h2>
{% for name, src in images %}<figure id="{{ name }}"><img src="data:image/png;base64,{{ src }}" alt="{{ name }}"><figcaption>{{ captions[name] }}</figcaption></figure>
{% endfor %}
<p style="color:#777;font-size:.8rem">steelray evaluate; numbers also in metrics.json beside this file.</p>
</body>
</html>
"""


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, (float, np.floating)):
        return "n/a" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def render(ev: evaluate.Evaluation, summary: dict, pngs: dict) -> str:
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    seg = ev.task == "segmentation"
    overall = ["dice", "iou", "detection_macro_f1"] if seg else \
        ["accuracy", "macro_f1", "micro_f1", "roc_auc_macro", "roc_auc_micro", "pr_auc_macro", "pr_auc_micro"]
    cols = ["class", "dice", "iou", "precision", "recall", "f1", "support", "roc_auc"] if seg else \
        ["class", "precision", "recall", "f1", "support", "roc_auc", "pr_auc"]
    headline = [(ev.metric, _fmt(ev.before[ev.metric]))]
    if not seg:
        headline.append(("accuracy", _fmt(ev.before["accuracy"])))
    if ev.robustness:
        headline.append(("bright vs dim gap", _fmt(ev.robustness["bright_dim_gap"])))
    headline.append(("images", str(len(ev.manifest))))
    train_cfg = ev.cfg if ev.cfg else None
    return env.from_string(TEMPLATE).render(
        s=_jsonable(summary), headline=headline, overall=overall, per_class_cols=cols, fmt=_fmt,
        preprocess=models.Preprocess.from_dict(ev.meta["preprocess"]).to_dict(), train_cfg=_Attr(ev.meta["config"]) if train_cfg else None,
        images=[(n, base64.b64encode(p).decode()) for n, p in pngs.items()], captions=CAPTIONS)


class _Attr(dict):
    """dict with attribute access for the template (train_cfg.train.lr)."""

    def __getattr__(self, k):
        v = self[k]
        return _Attr(v) if isinstance(v, dict) else v
