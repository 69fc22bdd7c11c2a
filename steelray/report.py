"""The evaluation report: PNG plots (matplotlib), one self-contained ``report.html`` (jinja2, the
PNGs embedded), and ``metrics.json``, written to a local folder or an s3:// prefix.

    ev = evaluate.run(opts); report.write(ev, "reports/neu-epoch-0069")
"""

from __future__ import annotations

import base64
import json
import math

import numpy as np

from steelray import evaluate, model_io, storage
from steelray.report_plots import CAPTIONS, PLOTTERS, to_png

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
        if name == "gradcam" and ("export" in ev.meta or "ensemble" in ev.meta):  # needs one PyTorch model
            continue
        if name in ("gradcam", "masks", "mistakes") and model is None:
            from steelray import predict

            model = predict.load_model(ev.job)
        fig = PLOTTERS[name](ev, model) if name in ("gradcam", "masks", "mistakes") else PLOTTERS[name](ev)
        if fig is None:
            continue
        pngs[name] = to_png(fig)
    summary = ev.summary()
    summary["calibration"] = {k: v for k, v in summary["calibration"].items() if k not in ("curves", "surfaces")}
    summary["images"] = [f"{n}.png" for n in pngs]
    written = {}
    for name, png in pngs.items():
        written[name] = storage.join(out, f"{name}.png")
        storage.write_bytes(written[name], png, ev.job.s3)
    written["metrics.json"] = storage.join(out, "metrics.json")
    storage.write_text(written["metrics.json"], json.dumps(_jsonable(summary), indent=1), ev.job.s3)
    written["report.html"] = storage.join(out, "report.html")
    storage.write_text(written["report.html"], render(ev, summary, pngs), ev.job.s3)
    return written


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


STYLE = """body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
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
"""  # shared with the night report

TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>steelray evaluation: {{ s.model.name }}{% if s.exported %} ONNX {{ s.exported.precision }}{% endif %} {{ s.task }}</title>
<style>
{{ style | safe }}</style>
</head>
<body>
<h1>Evaluation of {{ s.model.name }} ({{ s.task }}){% if s.exported %}, exported: ONNX {{ s.exported.precision }}{% endif %}</h1>
<p>Checkpoint <code>{{ s.checkpoint }}</code> (epoch {{ s.epoch }}), evaluated {{ s.evaluated_at }} on
{{ s.data.images }} images of <code>{{ s.data.root }}</code> ({{ s.data.format }}, {{ s.data.split }} split).</p>

<div class="headline">
{% for k, v in headline %}<div>{{ k }}<b>{{ v }}</b></div>{% endfor %}
</div>

<h2>Model card</h2>
<table class="card">
<tr><th>task</th><td>{{ s.task }}: {{ s.classes | join(", ") }}</td></tr>
<tr><th>model</th><td>{{ s.model.name }}{% if s.task == "segmentation" %} ({{ s.model.arch }}){% endif %}, input {{ preprocess.size | join("x") }}, {{ preprocess.in_chans }} channel(s), {% if preprocess.normalize == "image" %}each image normalised to its own mean and std{% elif preprocess.normalize == "center" %}each image less its own mean, over a fixed std{% elif preprocess.normalize == "equalize" %}each pixel ranked within its image (histogram equalisation){% else %}fixed mean/std normalisation{% endif %}</td></tr>
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
        preprocess=model_io.Preprocess.from_dict(ev.meta["preprocess"]).to_dict(), train_cfg=_Attr(ev.meta["config"]) if train_cfg else None,
        images=[(n, base64.b64encode(p).decode()) for n, p in pngs.items()], captions=CAPTIONS, style=STYLE)


class _Attr(dict):
    """dict with attribute access for the template (train_cfg.train.lr)."""

    def __getattr__(self, k):
        v = self[k]
        return _Attr(v) if isinstance(v, dict) else v
