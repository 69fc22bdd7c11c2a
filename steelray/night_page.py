"""The morning report's page: ``report.html`` (one self-contained file, plots embedded as PNG and
sheets as JPEG), ``report.json`` (every number on it) and ``review.csv`` (the sheets nearest the decision, one
``image`` URI per row as labelling tools import them), written to a local folder or an s3:// prefix.

    written = night_page.write(night_report.build(job), job)
"""

from __future__ import annotations

import base64
import csv
import io
import json

import logging

import numpy as np

from steelray import images, input_stats, rle, storage
from steelray.config import NightReportJob
from steelray.night_report import Night
from steelray.report import STYLE, _jsonable
from steelray.report_plots import to_png
from steelray.scoring.plan import file_tag

log = logging.getLogger(__name__)
THUMB_WIDTH = 480   # px of a sheet in the gallery


def out_folder(night: Night, job: NightReportJob) -> str:
    """``report.out``, or ``<output>/_reports/<night>-<version>`` (readers of the output skip ``_``)."""
    s = night.summary
    return job.report.out or storage.join(s["output"], "_reports", f"{s['night']}-{file_tag(s['version']['digest'])}")


def write(night: Night, job: NightReportJob) -> dict:
    """report.html, report.json and review.csv into ``out_folder``; returns {name: uri}."""
    import matplotlib

    matplotlib.use("Agg")
    out, s3 = out_folder(night, job), job.s3
    s = night.summary
    plots = {"volumes": _volumes_plot(s), "defects": _defects_plot(s), "drift": _drift_plot(night.drift_arrays, s["drift"])}
    if s["candidate"]:
        plots["candidate drift"] = _drift_plot(night.candidate_arrays, s["candidate"]["drift"])
    sheets = {c: [_thumb(p["source_uri"], night.masks.get(p["source_uri"], {}), s["version"]["classes"], s3)
                  for p in picks] for c, picks in s["gallery"].items()}
    flips = [_thumb(d["source_uri"], {}, [], s3) for d in (s["candidate"] or {}).get("disagreements", [])]
    written = {name: storage.join(out, name) for name in ("report.html", "report.json", "review.csv")}
    storage.write_text(written["report.json"], json.dumps(_jsonable(s), indent=1), s3)
    storage.write_text(written["review.csv"], review_csv(s["review"]), s3)
    storage.write_text(written["report.html"], render(s, plots, sheets, flips), s3)
    return written


def review_csv(review: list[dict]) -> str:
    buf = io.StringIO()
    if review:
        w = csv.DictWriter(buf, fieldnames=list(review[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(review)
    else:
        buf.write("image,image_id,class,probability,threshold,margin,predicted\n")
    return buf.getvalue()


# --- pictures -------------------------------------------------------------------------------------

def _thumb(uri: str, masks: dict[str, str], classes: list[str], s3) -> str | None:
    """A sheet as a base64 JPEG ``THUMB_WIDTH`` wide at most, each class's mask outlined; None where
    the image can no longer be read."""
    import cv2

    from steelray import synth

    try:
        grey = images.decode_image(storage.read_bytes(uri, s3), 1, uri)[:, :, 0]
    except Exception as e:  # moved, deleted, no access: the page says so in its place
        log.warning("gallery: %s: %s", uri, e)
        return None
    h, w = grey.shape
    stack = np.zeros((4, h, w), bool)
    for k, c in enumerate(classes[:4]):
        if masks.get(c):
            stack[k] = rle.decode(masks[c], (h, w))
    rgb = synth.overlay(grey, stack)
    scale = min(1.0, THUMB_WIDTH / w)
    rgb = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    return base64.b64encode(jpeg.tobytes()).decode() if ok else None


def _volumes_plot(s: dict) -> bytes:
    import matplotlib.pyplot as plt

    per = s["volumes"]["per_night"]
    fig, ax = plt.subplots(figsize=(8, 2.6))
    x = np.arange(len(per))
    scored, errors = [p["scored"] for p in per], [p["errors"] for p in per]
    ax.bar(x, scored, color="#4c78a8", label="scored")
    ax.bar(x, errors, bottom=scored, color="#e45756", label="error rows")
    ax.set_xticks(x, [p["night"][5:] for p in per])
    ax.set_ylabel("sheets")
    ax.legend(loc="upper left", fontsize=8)
    return to_png(fig)


def _defects_plot(s: dict) -> bytes:
    import matplotlib.pyplot as plt

    per = s["defects"]["per_night"]
    fig, ax = plt.subplots(figsize=(8, 2.8))
    nights = [p["night"][5:] for p in per]
    for c in s["version"]["classes"]:
        ax.plot(nights, [p["share"][c] for p in per], marker="o", label=c)
    ax.plot(nights, [p["any_defect"] for p in per], marker="s", color="black", linestyle="--", label="any defect")
    ax.set_ylabel("share of scored sheets")
    ax.legend(fontsize=7, ncol=4)
    return to_png(fig)


def _drift_plot(arrays: dict, d: dict) -> bytes:
    """Tonight's histogram over the reference's, one panel per class and input statistic."""
    import matplotlib.pyplot as plt

    names = list(arrays)
    cols = 4
    rows = max(1, -(-len(names) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(12, 2.3 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        now, ref = (a[~np.isnan(a)] for a in arrays[name])
        stat = d["classes"].get(name[len("class "):]) if name.startswith("class ") else d["inputs"].get(name)
        both = np.concatenate([now, ref]) if len(now) + len(ref) else np.zeros(1)
        bins = np.linspace(both.min(), both.max() + 1e-9, 30)
        if len(ref):
            ax.hist(ref, bins=bins, density=True, alpha=0.5, color="#888", label="reference")
        if len(now):
            ax.hist(now, bins=bins, density=True, histtype="step", linewidth=1.5, color="#d62728", label="tonight")
        flag = stat and stat["flagged"]
        ks = f"KS {stat['ks']:.2f}" if stat and stat["ks"] is not None else "not tested"
        ax.set_title(f"{name.removeprefix('input_')}: {ks}" + (" DRIFT" if flag else ""), fontsize=8,
                     color="#b00020" if flag else "black")
        ax.tick_params(labelsize=6)
        ax.ticklabel_format(useOffset=False)
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    return to_png(fig)


# --- the page -----------------------------------------------------------------------------------

TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>steelray night {{ s.night }}: {{ s.version.digest }}</title>
<style>
{{ style | safe }}
.sheets { display: flex; flex-wrap: wrap; gap: .5rem; } .sheets figure { margin: 0; width: 480px; }
ul.alerts li { color: #b00020; font-weight: 600; }
</style>
</head>
<body>
<h1>Night of {{ s.night }}</h1>
<p>Output <code>{{ s.output }}</code>, model version <code>{{ s.version.digest }}</code> ({{ s.version.task }}:
{{ s.version.classes | join(", ") }}){% if s.nights_before %}, against the {{ s.nights_before | length }} night(s) before
({{ s.nights_before[0] }} to {{ s.nights_before[-1] }}){% endif %}. Written {{ s.written }}.
{% if not s.version.thresholds %}<br><b class="bad">This output does not store the model's thresholds: 0.5 is assumed for the review list.</b>{% endif %}</p>

<div class="headline">
<div>sheets scored<b>{{ v.scored }}</b></div>
<div>error rows<b class="{{ 'bad' if v.error_rate > max_error_rate else '' }}">{{ v.errors }} ({{ pct(v.error_rate) }})</b></div>
<div>with a defect<b>{{ pct(s.defects.tonight.any_defect) }}</b></div>
<div>alerts<b class="{{ 'bad' if s.alerts else 'good' }}">{{ s.alerts | length }}</b></div>
</div>
{% if s.alerts %}<h2>Alerts</h2><ul class="alerts">{% for a in s.alerts %}<li>{{ a }}</li>{% endfor %}</ul>{% endif %}

<h2>Volumes</h2>
<p>{{ v.rows }} rows tonight{% if v.rows_before_mean is not none %} ({{ "%.0f" | format(v.rows_before_mean) }} a night before){% endif %};
error rate {{ pct(v.error_rate) }}{% if v.error_rate_before is not none %} ({{ pct(v.error_rate_before) }} before){% endif %}.
{{ v.jobs }} job(s) wrote into this night{% if v.inputs_listed is not none %}, listing up to {{ v.inputs_listed }} inputs and skipping {{ v.skipped }} already scored{% endif %}.</p>
{% if v.error_kinds %}<table><tr><th>error kind</th><th>rows</th></tr>
{% for k, n in v.error_kinds.items() %}<tr><td>{{ k }}</td><td>{{ n }}</td></tr>{% endfor %}</table>
<p>First errors:</p><ul>{% for e in v.first_errors %}<li><code>{{ e }}</code></li>{% endfor %}</ul>{% endif %}
<figure id="volumes"><img src="data:image/png;base64,{{ plots.volumes }}" alt="volumes per night"><figcaption>Rows per night: scored and error rows.</figcaption></figure>

<h2>Defects</h2>
<table><tr><th>class</th><th>tonight</th>{% if s.nights_before %}<th>nights before (mean)</th>{% endif %}{% if seg %}<th>mean area tonight (px)</th>{% endif %}</tr>
{% for c in s.version.classes %}<tr><td>{{ c }}</td><td>{{ pct(s.defects.tonight.share[c]) }}</td>{% if s.nights_before %}<td>{{ pct(before_share[c]) }}</td>{% endif %}{% if seg %}<td>{{ "%.0f" | format(s.defects.tonight.mean_area[c]) }}</td>{% endif %}</tr>
{% endfor %}</table>
<figure id="defects"><img src="data:image/png;base64,{{ plots.defects }}" alt="defect shares per night"><figcaption>Share of scored sheets labelled with each class, per night.</figcaption></figure>

<h2>Drift</h2>
<p>Each class's probabilities against the {{ s.drift.reference }}{% if s.drift.reference == "validation" %} (the checkpoint's own evaluation set){% endif %};
each input statistic against the nights before. Flagged where the Kolmogorov-Smirnov statistic is at least {{ max_ks }} and its p-value below {{ max_p }}.
{% if s.drift.inputs_note %}<br>{{ s.drift.inputs_note }}{% endif %}</p>
<table><tr><th>distribution</th><th>reference median</th><th>tonight median</th><th>KS</th><th>p</th><th>sheets (ref / tonight)</th><th>drift</th></tr>
{% for name, d in drift_rows(s.drift) %}<tr><td>{{ name }}</td><td>{{ num(d.reference_median) }}</td><td>{{ num(d.median) }}</td><td>{{ num(d.ks) }}</td><td>{{ "%.1e" | format(d.p) if d.p is not none else "-" }}</td><td>{{ d.reference_n }} / {{ d.n }}</td><td class="{{ 'bad' if d.flagged else '' }}">{{ "DRIFT" if d.flagged else "" }}</td></tr>
{% endfor %}</table>
<figure id="drift"><img src="data:image/png;base64,{{ plots.drift }}" alt="drift histograms"><figcaption>Tonight (red line) over the reference (grey). Input statistics: {% for k, what in stats.items() %}{{ k.removeprefix("input_") }}: {{ what }}{% if not loop.last %}; {% endif %}{% endfor %}.</figcaption></figure>

<h2>Most confident defects</h2>
{% for c, picks in s.gallery.items() %}<h3>{{ c }}</h3>{% if not picks %}<p>No sheet labelled {{ c }} tonight.</p>{% endif %}
<div class="sheets">{% for p in picks %}<figure>{% if sheets[c][loop.index0] %}<img src="data:image/jpeg;base64,{{ sheets[c][loop.index0] }}" alt="{{ p.image_id }}">{% else %}<p>(image no longer readable)</p>{% endif %}<figcaption>{{ p.image_id }}: {{ "%.3f" | format(p.prob) }}</figcaption></figure>{% endfor %}</div>
{% endfor %}

<h2>For review</h2>
<p>The {{ s.review | length }} sheets whose decision was closest ({{ "the two most probable classes" if s.version.task == "multiclass" else "probability nearest the class's threshold" }}), all in <code>review.csv</code> beside this page; the first 20:</p>
<table><tr>{% for k in review_cols %}<th>{{ k }}</th>{% endfor %}</tr>
{% for r in s.review[:20] %}<tr>{% for k in review_cols %}<td class="text">{{ r[k] }}</td>{% endfor %}</tr>{% endfor %}</table>

{% if s.candidate %}{% set c = s.candidate %}
<h2>Candidate {{ c.version.digest }} against production</h2>
<p>On the {{ c.sheets }} sheets both scored tonight without error ({{ c.only_production }} only by production, {{ c.only_candidate }} only by the candidate).
"Gained": the candidate labels it, production does not; "lost": the other way.</p>
<table><tr><th>class</th><th>agreement</th><th>production labels</th><th>candidate labels</th><th>gained</th><th>lost</th></tr>
{% for name, k in c.classes.items() %}<tr><td>{{ name }}</td><td>{{ pct(k.agreement) }}</td><td>{{ k.production }}</td><td>{{ k.candidate }}</td><td>{{ k.gained | length }}</td><td>{{ k.lost | length }}</td></tr>{% endfor %}</table>
<h3>Disagreements (largest probability gap first)</h3>
<div class="sheets">{% for d in c.disagreements %}<figure>{% if flips[loop.index0] %}<img src="data:image/jpeg;base64,{{ flips[loop.index0] }}" alt="{{ d.image_id }}">{% endif %}<figcaption>{{ d.image_id }} {{ d["class"] }}: production {{ "%.3f" | format(d.production) }}, candidate {{ "%.3f" | format(d.candidate) }}</figcaption></figure>{% endfor %}</div>
<h3>The candidate's drift (reference: {{ c.drift.reference }})</h3>
<table><tr><th>distribution</th><th>reference median</th><th>tonight median</th><th>KS</th><th>drift</th></tr>
{% for name, d in drift_rows(c.drift) %}<tr><td>{{ name }}</td><td>{{ num(d.reference_median) }}</td><td>{{ num(d.median) }}</td><td>{{ num(d.ks) }}</td><td class="{{ 'bad' if d.flagged else '' }}">{{ "DRIFT" if d.flagged else "" }}</td></tr>{% endfor %}</table>
<figure id="candidate-drift"><img src="data:image/png;base64,{{ plots["candidate drift"] }}" alt="candidate drift histograms"><figcaption>The candidate's distributions tonight over its reference.</figcaption></figure>
{% endif %}
<p style="color:#777;font-size:.8rem">steelray night report; every number also in report.json beside this file.</p>
</body>
</html>
"""


def render(s: dict, plots: dict, sheets: dict, flips: list) -> str:
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    s = _jsonable(s)
    before = s["defects"]["per_night"][:-1]
    before_share = {c: float(np.mean([p["share"][c] for p in before if p["share"][c] is not None] or [np.nan]))
                    for c in s["version"]["classes"]}
    return env.from_string(TEMPLATE).render(
        s=s, v=s["volumes"], plots={k: base64.b64encode(p).decode() for k, p in plots.items()}, sheets=sheets,
        flips=flips, seg=s["version"]["task"] == "segmentation", before_share=before_share, stats=input_stats.STATS,
        review_cols=list(s["review"][0]) if s["review"] else [], style=STYLE,
        max_error_rate=s["settings"]["max_error_rate"], max_ks=s["settings"]["max_ks"], max_p=s["settings"]["max_p"],
        pct=lambda x: "-" if x is None or x != x else f"{100 * x:.1f}%",
        num=lambda x: "-" if x is None else f"{x:.3f}",
        drift_rows=lambda d: [(f"class {c}", x) for c, x in d["classes"].items()]
        + [(k.removeprefix("input_"), x) for k, x in d["inputs"].items()])
