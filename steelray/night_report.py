"""The morning report's numbers: one night of a scoring output, for one model version, against the
nights before it (those the output holds); optionally a candidate version judged on the same sheets.

    night = night_report.build(config.load(None, ["report.output=s3://plant/predictions"], config.NightReportJob))
    night.summary["alerts"]     # what should wake someone: drift flags, an error rate past its bound

``build`` reads only the columns and nights it needs and returns a ``Night``: ``summary`` (JSON-ready,
every number the page shows) plus the arrays its plots draw. ``night_page.write`` renders it.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from steelray import drift, input_stats, registry, storage
from steelray.config import NightReportJob
from steelray.scoring import output
from steelray.scoring.plan import CLASSES_KEY, DECISION_KEY, NO_DEFECT_NAMES, column_name, file_tag

_NIGHT = re.compile(r"run_date=(\d{4}-\d{2}-\d{2})")
# (substring of the decode stage's message, kind): the first match names an error row's kind
ERROR_KINDS = ((": not found (", "missing"), ("read failed after", "read failed"), ("empty file", "empty file"),
               ("not an image", "not an image"), ("unreadable", "corrupt or truncated"),
               ("unexpected size", "wrong size"), ("greyscale", "more than 8 bits"))


class ReportError(ValueError):
    """The output, night or version asked for is not there."""


@dataclass
class Version:
    """One model version as the output knows it: its digest, classes and decision."""

    digest: str
    classes: list[str]
    task: str
    thresholds: list[float] | None  # None: an output written before they were stored (0.5 assumed)
    checkpoint: str = ""            # its folder, where given

    @property
    def probs(self) -> list[str]:
        return [f"prob_{column_name(c)}" for c in self.classes]


@dataclass
class Night:
    summary: dict
    drift_arrays: dict = field(default_factory=dict)    # name -> (tonight, reference) values
    candidate_arrays: dict = field(default_factory=dict)
    masks: dict = field(default_factory=dict)           # segmenters: gallery sheet URI -> {class: RLE}


def error_kind(message: str) -> str:
    return next((kind for key, kind in ERROR_KINDS if key in message), "other")


def build(job: NightReportJob) -> Night:
    r, s3 = job.report, job.s3
    if not r.output:
        raise ReportError("report.output: required (the scoring output's root, score.output)")
    dataset = output.open_output(r.output, s3)
    if dataset is None:
        raise ReportError(f"{r.output}: no scoring output there")
    nights = sorted({m.group(1) for f in dataset.files if (m := _NIGHT.search(f))})
    night = r.night or nights[-1]
    if night not in nights:
        raise ReportError(f"report.night {night}: {r.output} has no rows for it; nights there: "
                          f"{', '.join(nights[-10:])}")
    window = [n for n in nights if n < night][-r.nights:] if r.nights else []
    window.append(night)
    prod = _version(dataset, r.output, r.version, registry.resolve(r.checkpoint, job.tracking, s3), night, s3,
                    "report")
    cand = None
    if r.candidate:  # a checkpoint folder (or models:/), or a version (digests have no "/")
        r = replace(r, candidate=registry.resolve(r.candidate, job.tracking, s3))
        folder = "/" in r.candidate or storage.isdir(r.candidate, s3)
        cand = _version(dataset, r.output, "" if folder else r.candidate, r.candidate if folder else "",
                        night, s3, "report.candidate")
    rows = _rows(dataset, window, [v.digest for v in (prod, cand) if v], prod, cand)
    mine = rows.filter(pc.field("checkpoint") == prod.digest)
    tonight = mine.filter(pc.field("run_date") == night)
    before = mine.filter(pc.field("run_date") != night)
    if not tonight.num_rows:
        raise ReportError(f"{r.output}: version {prod.digest} has no rows on {night}; versions that night: "
                          f"{', '.join(sorted(set(rows.filter(pc.field('run_date') == night).column('checkpoint').to_pylist())))}")
    summary = {"output": r.output, "night": night, "nights_before": window[:-1],
               "settings": {k: getattr(r, k) for k in ("nights", "reference", "max_ks", "max_p", "max_error_rate")},
               "version": _describe(prod), "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "volumes": _volumes(mine, window, r.output, prod.digest, night, s3),
               "defects": _defects(mine, window, prod),
               "gallery": _gallery(tonight, prod, r.gallery),
               "review": _review(tonight, prod, r.review)}
    night_obj = Night(summary)
    if prod.task == "segmentation":
        picked = [p["source_uri"] for picks in summary["gallery"].values() for p in picks]
        night_obj.masks = _masks(dataset, night, prod, picked)
    summary["drift"] = _drift(tonight, before, prod, r, s3, night_obj.drift_arrays)
    summary["candidate"] = None
    if cand is not None:
        theirs = rows.filter(pc.field("checkpoint") == cand.digest)
        summary["candidate"] = _compare(night, tonight, theirs, prod, cand, r, s3, night_obj.candidate_arrays)
    summary["alerts"] = _alerts(summary, r)
    return night_obj


# --- reading -------------------------------------------------------------------------------------

def _version(dataset, root: str, digest: str, checkpoint: str, night: str, s3, setting: str) -> Version:
    """The version asked for (a digest, a checkpoint folder, or tonight's most rows), with the
    classes and decision stored in one of its files."""
    if checkpoint:
        from steelray.scoring.plan import describe

        digest = describe(checkpoint, s3).digest
    if not digest:
        counts = pc.value_counts(dataset.to_table(columns=["checkpoint"], filter=pc.field("run_date") == night)
                                 .column("checkpoint")).to_pylist()
        digest = max(counts, key=lambda c: c["counts"])["values"]
    files = [f for f in dataset.files if output.version_of(f) == file_tag(digest)]
    if not files:
        raise ReportError(f"{setting}: version {digest} has no files in {root}")
    meta = pq.read_schema(files[-1], filesystem=dataset.filesystem).metadata or {}
    classes = json.loads(meta.get(CLASSES_KEY, b"[]"))
    decision = json.loads(meta[DECISION_KEY]) if DECISION_KEY in meta else None
    if not classes:
        raise ReportError(f"{files[-1]}: names no classes (not written by the scoring job)")
    task = decision["task"] if decision else ("multilabel" if len(classes) > 1 else "binary")
    return Version(digest, classes, task, decision["thresholds"] if decision else None, checkpoint)


def _rows(dataset, window: list[str], digests: list[str], *versions) -> pa.Table:
    names = set(dataset.schema.names)
    wanted = ["image_id", "source_uri", "checkpoint", "run_date", "error", "labels", "any_defect", "height", "width"]
    for v in versions:
        if v is not None:
            wanted += v.probs + [f"area_{column_name(c)}" for c in v.classes]
    wanted += list(input_stats.STATS)
    columns = [c for c in dict.fromkeys(wanted) if c in names]
    filt = pc.field("run_date").isin(window) & pc.field("checkpoint").isin(digests)
    return dataset.to_table(columns=columns, filter=filt)


def _masks(dataset, night: str, v: Version, uris: list[str]) -> dict:
    """{uri: {class: RLE}} of the version's rows of ``uris`` that night (the gallery's outlines)."""
    if not uris:
        return {}
    columns = [f"rle_{column_name(c)}" for c in v.classes]
    t = dataset.to_table(columns=["source_uri", *columns], filter=(pc.field("run_date") == night)
                         & (pc.field("checkpoint") == v.digest) & pc.field("source_uri").isin(uris))
    return {row["source_uri"]: {c: row[col] for c, col in zip(v.classes, columns)} for row in t.to_pylist()}


def _describe(v: Version) -> dict:
    return {"digest": v.digest, "classes": v.classes, "task": v.task, "thresholds": v.thresholds,
            "checkpoint": v.checkpoint or None}


# --- sections ------------------------------------------------------------------------------------

def _volumes(rows: pa.Table, window: list[str], root: str, digest: str, night: str, s3) -> dict:
    per_night = []
    for n in window:
        t = rows.filter(pc.field("run_date") == n)
        errors = [e for e in t.column("error").to_pylist() if e]
        kinds: dict[str, int] = {}
        for e in errors:
            kinds[error_kind(e)] = kinds.get(error_kind(e), 0) + 1
        per_night.append({"night": n, "rows": t.num_rows, "scored": t.num_rows - len(errors), "errors": len(errors),
                          "error_rate": len(errors) / t.num_rows if t.num_rows else 0.0,
                          "error_kinds": dict(sorted(kinds.items()))})
    tonight, before = per_night[-1], per_night[:-1]
    jobs = _jobs(root, digest, night, s3)
    return {**tonight, "per_night": per_night,
            "rows_before_mean": float(np.mean([p["rows"] for p in before])) if before else None,
            "error_rate_before": (sum(p["errors"] for p in before) / max(1, sum(p["rows"] for p in before)))
            if before else None,
            "jobs": len(jobs), "inputs_listed": max((j["inputs"] for j in jobs), default=None),
            "skipped": sum(j["skipped"] for j in jobs), "first_errors": _first_errors(rows, night)}


def _first_errors(rows: pa.Table, night: str, k: int = 5) -> list[str]:
    t = rows.filter((pc.field("run_date") == night) & pc.field("error").is_valid())
    return t.column("error").to_pylist()[:k]


def _jobs(root: str, digest: str, night: str, s3) -> list[dict]:
    """The summaries (``_runs/``) of the version's jobs that wrote into the night (any finish date:
    a backfill writes into an old night), read 16 at a time."""
    from concurrent.futures import ThreadPoolExecutor

    folder, tag = storage.join(root, "_runs"), file_tag(digest)
    names = [n for n in storage.list_names(folder, s3) if n.endswith(f"-{tag}.json")]
    with ThreadPoolExecutor(16) as pool:
        bodies = list(pool.map(lambda n: json.loads(storage.read_text(storage.join(folder, n), s3)), names))
    return [b for b in bodies if b.get("checkpoint") == digest
            and b.get("output", "").rstrip("/").endswith(f"run_date={night}")]


def _labels(rows: pa.Table, v: Version) -> np.ndarray:
    """(N, C) bool: which classes each row was labelled with."""
    index = {c: k for k, c in enumerate(v.classes)}
    out = np.zeros((rows.num_rows, len(v.classes)), bool)
    for i, labels in enumerate(rows.column("labels").to_pylist()):
        for c in labels or ():
            if c in index:
                out[i, index[c]] = True
    return out


def _defect_classes(v: Version) -> list[str]:
    return [c for c in v.classes if c.lower() not in NO_DEFECT_NAMES]


def _defects(rows: pa.Table, window: list[str], v: Version) -> dict:
    """Share of scored sheets per predicted class, per night; segmenters also the mean defect area."""
    per_night = []
    for n in window:
        t = rows.filter((pc.field("run_date") == n) & pc.field("error").is_null())
        labels = _labels(t, v)
        entry = {"night": n, "scored": t.num_rows,
                 "share": {c: float(labels[:, k].mean()) if t.num_rows else None for k, c in enumerate(v.classes)},
                 "any_defect": float(np.mean(t.column("any_defect").to_numpy(zero_copy_only=False)))
                 if t.num_rows else None}
        if v.task == "segmentation":
            entry["mean_area"] = {c: float(pc.mean(t.column(f"area_{column_name(c)}")).as_py() or 0.0)
                                  for c in v.classes}
        per_night.append(entry)
    return {"tonight": per_night[-1], "per_night": per_night}


def _probs(rows: pa.Table, v: Version) -> np.ndarray:
    return np.stack([rows.column(p).to_numpy(zero_copy_only=False).astype(np.float64) for p in v.probs], 1) \
        if rows.num_rows else np.zeros((0, len(v.classes)))


def _thresholds(v: Version) -> np.ndarray:
    return np.asarray(v.thresholds if v.thresholds else [0.5] * len(v.classes), np.float64)


def _gallery(tonight: pa.Table, v: Version, k: int) -> dict:
    """Per defect class, the ``k`` sheets labelled with it at the highest probability."""
    ok = tonight.filter(pc.field("error").is_null())
    probs, labels = _probs(ok, v), _labels(ok, v)
    ids, uris = ok.column("image_id").to_pylist(), ok.column("source_uri").to_pylist()
    out = {}
    for c in _defect_classes(v):
        j = v.classes.index(c)
        idx = [i for i in np.argsort(-probs[:, j], kind="stable") if labels[i, j]][:k]
        out[c] = [{"image_id": ids[i], "source_uri": uris[i], "prob": float(probs[i, j])} for i in idx]
    return out


def _review(tonight: pa.Table, v: Version, k: int) -> list[dict]:
    """The ``k`` scored sheets whose decision was closest: multi-label, binary and segmenters by the
    class whose probability (a segmenter's: its peak pixel) sits nearest its threshold; multi-class
    by the gap between the two most probable classes."""
    ok = tonight.filter(pc.field("error").is_null())
    if not ok.num_rows or not k:
        return []
    probs = _probs(ok, v)
    if v.task == "multiclass":
        order = np.argsort(-probs, 1)
        rows = np.arange(len(probs))
        margin = probs[rows, order[:, 0]] - probs[rows, order[:, 1]]
        which, against = order[:, 0], probs[rows, order[:, 1]]
    else:
        t = _thresholds(v)
        gap = np.abs(probs - t)
        which = gap.argmin(1)
        margin = gap[np.arange(len(probs)), which]
        against = t[which]
    ids, uris = ok.column("image_id").to_pylist(), ok.column("source_uri").to_pylist()
    labels = ok.column("labels").to_pylist()
    out = []
    for i in np.argsort(margin, kind="stable")[:k]:
        out.append({"image": uris[i], "image_id": ids[i], "class": v.classes[which[i]],
                    "probability": round(float(probs[i, which[i]]), 5),
                    ("runner_up" if v.task == "multiclass" else "threshold"): round(float(against[i]), 5),
                    "margin": round(float(margin[i]), 5), "predicted": ";".join(labels[i] or [])})
    return out


def _reference_probs(v: Version, s3) -> np.ndarray | None:
    """The checkpoint's validation probabilities (``REFERENCE``), where it has them."""
    if not v.checkpoint:
        return None
    from steelray.checkpoint import REFERENCE  # torch: imported only where a checkpoint is read

    uri = storage.join(v.checkpoint, REFERENCE)
    if not storage.isfile(uri, s3):
        return None
    import io

    table = pq.read_table(io.BytesIO(storage.read_bytes(uri, s3)))
    missing = [p for p in v.probs if p not in table.column_names]
    if missing:
        raise ReportError(f"{uri}: lacks {', '.join(missing)} (another model's reference?)")
    return _probs(table, v)


def _drift(tonight: pa.Table, before: pa.Table, v: Version, r, s3, arrays: dict) -> dict:
    """Each class's probabilities against the reference; each input statistic against the nights before."""
    ok, ok_before = (t.filter(pc.field("error").is_null()) for t in (tonight, before))
    reference = _reference_probs(v, s3) if r.reference in ("auto", "validation") else None
    if r.reference == "validation" and reference is None:
        raise ReportError(f"report.reference=validation: checkpoint {v.checkpoint or '(none given: report.checkpoint)'} "
                          "has no validation probabilities (jobs/evaluate.py keeps them in it)")
    source = "validation" if reference is not None else "nights before"
    if reference is None:
        reference = _probs(ok_before, v)
    probs = _probs(ok, v)
    out = {"reference": source, "classes": {}, "inputs": {}, "inputs_note": None}
    for k, c in enumerate(v.classes):
        out["classes"][c] = drift.compare(probs[:, k], reference[:, k], r.max_ks, r.max_p)
        arrays[f"class {c}"] = (probs[:, k], reference[:, k])
    have = [s for s in input_stats.STATS if s in ok.column_names]
    measured = [s for s in have if ok.column(s).null_count < ok.num_rows]
    if not measured:
        out["inputs_note"] = ("tonight's rows have no input statistics (scored before the decode stage "
                              "measured sheets): no input drift")
        return out
    for s in measured:
        now = ok.column(s).to_numpy(zero_copy_only=False).astype(np.float64)
        ref = ok_before.column(s).to_numpy(zero_copy_only=False).astype(np.float64) if s in ok_before.column_names \
            else np.zeros(0)
        out["inputs"][s] = drift.compare(now, ref, r.max_ks, r.max_p)
        arrays[s] = (now, ref)
    return out


def _compare(night: str, tonight: pa.Table, theirs: pa.Table, prod: Version, cand: Version, r, s3,
             arrays: dict) -> dict:
    """The candidate against production on the sheets both scored ``night`` without error."""
    ok_p = tonight.filter(pc.field("error").is_null())
    cand_tonight = theirs.filter(pc.field("run_date") == night)
    ok_c = cand_tonight.filter(pc.field("error").is_null())
    common = sorted(set(ok_p.column("source_uri").to_pylist()) & set(ok_c.column("source_uri").to_pylist()))
    if not common:
        raise ReportError(f"report.candidate: versions {prod.digest} and {cand.digest} share no scored sheet on {night}")
    keys = pa.array(common, pa.string())

    def aligned(t: pa.Table) -> pa.Table:
        t = t.filter(pc.is_in(t.column("source_uri"), keys))
        return t.take(pc.sort_indices(t, [("source_uri", "ascending")]))

    a, b = aligned(ok_p), aligned(ok_c)
    ids = a.column("image_id").to_pylist()
    uris = a.column("source_uri").to_pylist()
    shared = [c for c in prod.classes if c in cand.classes]
    la, lb = _labels(a, prod), _labels(b, cand)
    per_class = {}
    for c in shared + ["any defect"]:
        if c == "any defect":
            ya = a.column("any_defect").to_numpy(zero_copy_only=False).astype(bool)
            yb = b.column("any_defect").to_numpy(zero_copy_only=False).astype(bool)
        else:
            ya, yb = la[:, prod.classes.index(c)], lb[:, cand.classes.index(c)]
        gained, lost = np.flatnonzero(~ya & yb), np.flatnonzero(ya & ~yb)
        per_class[c] = {"agreement": float((ya == yb).mean()), "production": int(ya.sum()), "candidate": int(yb.sum()),
                        "gained": [ids[i] for i in gained], "lost": [ids[i] for i in lost]}
    pa_, pb = _probs(a, prod), _probs(b, cand)
    disagree = []
    for c in shared:
        j, jj = prod.classes.index(c), cand.classes.index(c)
        for i in np.flatnonzero(la[:, j] != lb[:, jj]):
            disagree.append({"image_id": ids[i], "source_uri": uris[i], "class": c, "production": float(pa_[i, j]),
                             "candidate": float(pb[i, jj]), "gap": float(abs(pa_[i, j] - pb[i, jj]))})
    disagree.sort(key=lambda d: -d["gap"])
    before = theirs.filter(pc.field("run_date") != night)
    return {"version": _describe(cand), "sheets": len(common),
            "only_production": ok_p.num_rows - len(common), "only_candidate": ok_c.num_rows - len(common),
            "classes": per_class, "disagreements": disagree[:r.gallery * max(1, len(shared))],
            "drift": _drift(cand_tonight, before, cand, r, s3, arrays)}


def _alerts(summary: dict, r) -> list[str]:
    out = []
    vol = summary["volumes"]
    if vol["error_rate"] > r.max_error_rate:
        out.append(f"error rate {vol['error_rate']:.1%} ({vol['errors']} of {vol['rows']} rows) is above "
                   f"report.max_error_rate {r.max_error_rate:.1%}")
    d = summary["drift"]
    for c, s in d["classes"].items():
        if s["flagged"]:
            out.append(f"class {c}: probabilities drifted from the {d['reference']} (KS {s['ks']:.2f}, "
                       f"median {s['reference_median']:.3f} -> {s['median']:.3f})")
    for name, s in d["inputs"].items():
        if s["flagged"]:
            out.append(f"{name}: sheets drifted from the nights before (KS {s['ks']:.2f}, "
                       f"median {s['reference_median']:.3f} -> {s['median']:.3f})")
    return out
