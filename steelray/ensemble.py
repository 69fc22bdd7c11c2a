"""Ensembles: several checkpoints of one task and class set (the fold models of a cross-validation,
or different backbones) whose probabilities are averaged, used wherever a checkpoint is.

An ensemble is a folder (local or s3://) holding ``ensemble.json``:
    members     the checkpoint folders (or, all of them, exported ``.onnx`` files), as URIs or paths
                relative to the ensemble folder
    thresholds  per class, applied to the averaged probabilities (``jobs/evaluate.py
                --write-thresholds`` calibrates them there); min_area for segmenters
    route       optional: {"model": a checkpoint (or .onnx), "black_share_above": s}: an image whose
                model input has more than the share s of its pixels black (0: under-exposed, its
                shadows clipped) is read by that model alone instead of the members' average
Its members (and its route's model) must take the same input (size and channels; each normalises its
own way). Scoring (``plan.describe``), evaluation (``predict``) and the night report read it as one
model; its version is the digest of its members' versions, its route (model and share), its decision
settings and ``score.tta``. Imports no torch.
"""

from __future__ import annotations

import json

import numpy as np

from steelray import model_io, onnx_model, storage
from steelray.storage import S3Config

FILE = "ensemble.json"
FORMAT = "steelray-ensemble/1"


class EnsembleError(ValueError):
    """An ensemble that cannot be built or read as given; the message says which member and why."""


def is_ensemble(uri: str, s3: S3Config | None = None) -> bool:
    return not onnx_model.is_exported(uri) and storage.isfile(storage.join(uri, FILE), s3)


def member_uris(uri: str, spec: dict) -> list[str]:
    """The members' URIs, those given relative to the ensemble folder resolved against it."""
    return [m if "://" in m or m.startswith("/") else storage.join(uri, m) for m in spec["members"]]


def read(uri: str, s3: S3Config | None = None) -> dict:
    try:
        spec = json.loads(storage.read_text(storage.join(uri, FILE), s3))
    except FileNotFoundError:
        raise EnsembleError(f"{uri}: not an ensemble (no {FILE})") from None
    if spec.get("format") != FORMAT or not spec.get("members"):
        raise EnsembleError(f"{storage.join(uri, FILE)}: not a {FORMAT} file with members")
    return spec


def member_meta(uri: str, s3: S3Config | None = None) -> dict:
    """A member's meta: its checkpoint's meta.json, or the one its exported file carries."""
    if onnx_model.is_exported(uri):
        return onnx_model.read_meta(uri, s3)
    try:
        return json.loads(storage.read_text(storage.join(uri, "meta.json"), s3))
    except FileNotFoundError:
        raise EnsembleError(f"member {uri}: not a steelray checkpoint (no meta.json)") from None


def route_of(uri: str, spec: dict) -> tuple[str, float] | None:
    """The route's (model URI, black share above which an image goes to it), or None."""
    route = spec.get("route")
    if not route:
        return None
    return member_uris(uri, {"members": [route["model"]]})[0], float(route["black_share_above"])


def black_share(images) -> np.ndarray:
    """Per image of a uint8 batch (N, ...): the share of its pixels that are 0, the route's measure."""
    flat = np.asarray(images).reshape(len(images), -1)
    return (flat == 0).mean(1)


def meta(uri: str, s3: S3Config | None = None) -> dict:
    """The ensemble as a checkpoint's meta: the first member's (its config rebuilds the labelled set),
    with the ensemble's thresholds, minimum areas and name, ``ensemble``: the members' URIs, and
    ``route``: (model URI, black share) where it routes clipped images."""
    spec = read(uri, s3)
    members = member_uris(uri, spec)
    route = route_of(uri, spec)
    metas = [member_meta(m, s3) for m in members]
    routed = [member_meta(route[0], s3)] if route else []
    first = metas[0]
    names = [m["model"]["name"] for m in metas]
    name = f"ensemble of {len(members)} ({', '.join(sorted(set(names)))})"
    if route:
        name += f", clipped > {route[1]:g} to {routed[0]['model']['name']}"
    model = {**first["model"], "name": name}
    out = {**first, "model": model, "thresholds": spec["thresholds"], "ensemble": members, "epoch": None, "metrics": {}}
    if route:
        out["route"] = list(route)
    if "config" in first:  # turned only if every member's training turned its images (model_io.trained_turned)
        turned = all(model_io.trained_turned(m) for m in metas + routed)
        out["config"] = {**first["config"], "input": {**first["config"].get("input", {}), "turns": turned}}
    out.pop("export", None)
    out.pop("min_area", None)  # the ensemble's own, once calibrated on its averaged masks
    if spec.get("min_area"):
        out["min_area"] = spec["min_area"]
    return out


def write(out: str, members: list[str], s3: S3Config | None = None, route: tuple[str, float] | None = None) -> dict:
    """An ensemble of ``members`` in folder ``out``: checked to share task, classes and input, its
    thresholds the members' mean (0.5 each, the argmax, for a multi-class task) until calibrated.
    ``route``: (model, black share): images with more of their pixels black go to that model alone
    (checked like a member)."""
    from steelray.model_io import Preprocess

    if not members:
        raise EnsembleError("an ensemble needs at least one member")
    members = [storage.absolute(m) for m in members]  # as given to a command: relative to where it ran
    routed = [storage.absolute(route[0])] if route else []
    if route and not 0 <= route[1] < 1:
        raise EnsembleError(f"route: black share {route[1]} is not in [0, 1)")
    if len({onnx_model.is_exported(m) for m in members + routed}) > 1:
        raise EnsembleError("members: all checkpoint folders or all exported .onnx files, not a mix")
    metas = [member_meta(m, s3) for m in members + routed]
    first, pre = metas[0], Preprocess.from_dict(metas[0]["preprocess"])
    for m, other in zip((members + routed)[1:], metas[1:]):
        for key in ("task", "classes"):
            if other[key] != first[key]:
                raise EnsembleError(f"member {m}: {key} {other[key]} differs from {members[0]}'s {first[key]}")
        if not pre.same_input(Preprocess.from_dict(other["preprocess"])):
            raise EnsembleError(f"member {m}: input {other['preprocess']['size']} x {other['preprocess']['in_chans']} "
                                f"channel(s) differs from {members[0]}'s {list(pre.size)} x {pre.in_chans}")
    n, metas = len(first["thresholds"]), metas[:len(members)]
    thresholds = ([0.5] * n if first["task"] == "multiclass"
                  else [sum(m["thresholds"][c] for m in metas) / len(metas) for c in range(n)])
    spec = {"format": FORMAT, "members": list(members), "task": first["task"], "classes": first["classes"],
            "thresholds": thresholds}
    if route:
        spec["route"] = {"model": routed[0], "black_share_above": float(route[1])}
    storage.write_text(storage.join(out, FILE), json.dumps(spec, indent=1), s3)
    return spec


def fold_models(sweep: str, s3: S3Config | None = None) -> list[str]:
    """The fold models of a cross-validation (``jobs/crossval.py``): each fold's kept checkpoint."""
    import io

    import pandas as pd

    try:
        folds = pd.read_csv(io.StringIO(storage.read_text(storage.join(sweep, "folds.csv"), s3)))
    except FileNotFoundError:
        raise EnsembleError(f"{sweep}: no folds.csv (not a jobs/crossval.py sweep folder, or not finished)") from None
    missing = folds[folds.checkpoint.isna() | (folds.status != "completed")]
    if len(missing):
        raise EnsembleError(f"{sweep}: fold(s) {', '.join(map(str, missing.fold))} did not complete with a checkpoint")
    return folds.sort_values("fold").checkpoint.tolist()


def write_thresholds(uri: str, thresholds: list[float], min_area: list[int] | None, note: dict,
                     s3: S3Config | None = None) -> str:
    """Calibrated thresholds into the ensemble's file (the previous one is kept beside it)."""
    path = storage.join(uri, FILE)
    old = storage.read_text(path, s3)
    stamp = note["at"].replace(":", "").replace("+0000", "Z")
    storage.write_text(storage.join(uri, f"ensemble.before-{stamp}.json"), old, s3)
    spec = json.loads(old)
    spec["thresholds"] = thresholds
    if min_area is not None:
        spec["min_area"] = min_area
    spec["calibration"] = note
    storage.write_text(path, json.dumps(spec, indent=1), s3)
    return path
