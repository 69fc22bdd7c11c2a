"""What a scoring job's checkpoint(s) mean for it: the model versions, their inputs, the output's
columns, and the rule that turns probabilities into labels.

A model version (``digest``) is the SHA-256 of the weights and the decision settings (thresholds,
minimum areas): recalibrating a checkpoint makes a new version, which a rerun scores again. An
exported model's version is its file's SHA-256 (the file holds its decision settings), as
``jobs/export.py`` reports it, unless ``score.min_area`` overrides the file's minimum areas.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from steelray import ensemble, input_stats, metrics, model_io, onnx_model, storage
from steelray.config import ScoreConfig
from steelray.images import SEVERSTAL_SIZE
from steelray.model_io import Preprocess
from steelray.storage import S3Config

# Class names that mean "no defect" for a multi-class classifier's any_defect flag and cascade gate.
NO_DEFECT_NAMES = {"ok", "no_defect", "nodefect", "no-defect", "none", "normal", "clean", "good", "0"}
CLASSES_KEY = b"steelray.classes"   # Parquet schema metadata: the class names behind the columns,
DECISION_KEY = b"steelray.decision"  # and the final model's task and thresholds (its version fixes them)


class ScoreError(RuntimeError):
    """The job cannot start (bad input listing or checkpoint), or its output cannot take it."""


def column_name(cls: str) -> str:
    """A class name as a column-name suffix: ``rolled-in_scale`` -> ``rolled_in_scale``."""
    return re.sub(r"\W+", "_", str(cls)).strip("_") or "class"


def file_tag(digest: str) -> str:
    """A model version as it appears in file names (a cascade's ``gate>segmenter`` has a ``>``)."""
    return re.sub(r"[^0-9A-Za-z]+", "_", digest)


@dataclass(frozen=True)
class ModelInfo:
    """What the driver and the actors need to know about one checkpoint."""

    uri: str
    task: str
    classes: tuple[str, ...]        # output names: binary -> ("defect",)
    thresholds: tuple[float, ...]
    preprocess: Preprocess
    name: str                       # e.g. resnet18, unet-resnet34
    digest: str                     # sha256 of the weights and decision settings, first 16 hex digits
    data_format: str
    min_area: tuple[int, ...] = ()  # segmenters: per class, calibrated by jobs/evaluate.py (empty: 0)
    exported: bool = False          # an .onnx file of jobs/export.py (ONNX Runtime), not a checkpoint folder
    tta: str = "none"               # test-time augmentation (model_io.TTA_VIEWS), part of the version
    members: tuple[ModelInfo, ...] = ()  # an ensemble's: their probabilities are averaged
    route: ModelInfo | None = None  # an ensemble's model for clipped images: more than route_above black
    route_above: float = 1.0

    @property
    def segmenter(self) -> bool:
        return self.task == "segmentation"


def describe(uri: str, s3: S3Config | None = None, min_area: tuple[int, ...] = (), tta: str = "none") -> ModelInfo:
    """The checkpoint at ``uri``; for a segmenter, ``min_area`` (``score.min_area``) replaces the
    checkpoint's own minimum mask areas, and so makes another model version where it differs, as
    test-time augmentation (``tta``, other than none) does. An ensemble folder is one model whose
    version follows from its members' versions and its own decision settings."""
    members: tuple[ModelInfo, ...] = ()
    route, route_above = None, 1.0
    try:
        if onnx_model.is_exported(uri):  # the file itself is the version's weights
            weights = onnx_model.read(uri, s3)
            meta = onnx_model.OnnxModel(weights, uri).meta
        elif ensemble.is_ensemble(uri, s3):
            meta = ensemble.meta(uri, s3)
            members = tuple(describe(m, s3, (), tta) for m in meta["ensemble"])
            weights = "\n".join(sorted(m.digest for m in members)).encode()  # the set: order is no version
            if "route" in meta:
                route, route_above = describe(meta["route"][0], s3, (), tta), float(meta["route"][1])
                weights += f"\nroute black>{route_above!r}: {route.digest}".encode()
        else:
            from steelray import checkpoint  # torch: imported where needed, so decode workers stay light

            meta = checkpoint.read_meta(uri, s3)
            weights = storage.read_bytes(storage.join(uri, checkpoint.WEIGHTS), s3)
    except (FileNotFoundError, onnx_model.ExportedModelError, ensemble.EnsembleError) as e:
        raise ScoreError(f"checkpoint {uri}: {e}") from None
    task = meta["task"]
    classes = ("defect",) if task == "binary" else tuple(meta["classes"])
    model = meta.get("model", {})
    name = f"{model.get('arch')}-{model.get('name')}" if task == "segmentation" and not members else str(model.get("name"))
    if any(not m.preprocess.same_input(members[0].preprocess) or m.exported != members[0].exported
           for m in members + ((route,) if route else ())):
        raise ScoreError(f"ensemble {uri}: its members take different inputs, or mix checkpoints and exported "
                         "models; rebuild it with jobs/ensemble.py")
    if "export" in meta:
        name += f" onnx-{meta['export']['precision']}"
    thresholds, own = tuple(meta["thresholds"]), tuple(meta.get("min_area") or ())
    differs = task == "segmentation" and min_area and tuple(min_area) != (own or (0,) * len(classes))
    min_area = tuple(min_area) if differs else own
    decision = json.dumps({"thresholds": thresholds, "min_area": min_area}).encode()
    if onnx_model.is_exported(uri) and not differs:  # the file holds its decision: its digest is the version
        decision = b""
    if tta != "none":
        decision += f"tta={tta}".encode()
    preprocess = Preprocess.from_dict(meta["preprocess"])
    try:
        model_io.check_tta(tta, preprocess, f"score.tta for {uri}", model_io.trained_turned(meta))
    except ValueError as e:
        raise ScoreError(str(e)) from None
    return ModelInfo(uri=uri, task=task, classes=classes, thresholds=thresholds,
                     preprocess=preprocess, name=name,
                     digest=hashlib.sha256(weights + decision).hexdigest()[:16],
                     data_format=meta.get("config", {}).get("data", {}).get("format", ""), min_area=min_area,
                     exported=members[0].exported if members else onnx_model.is_exported(uri), tta=tta,
                     members=members, route=route, route_above=route_above)


@dataclass(frozen=True)
class Plan:
    """The checkpoint(s) of one run and what follows from them: input shapes, columns, identity."""

    primary: ModelInfo                   # the classifier (cascade gate) or the only model
    segmenter: ModelInfo | None          # cascade's second stage
    expect_size: tuple[int, int] | None
    min_area: tuple[int, ...]

    @property
    def final(self) -> ModelInfo:
        return self.segmenter or self.primary

    @property
    def cascade(self) -> bool:
        return self.segmenter is not None

    @property
    def model_name(self) -> str:
        return f"{self.primary.name} > {self.segmenter.name}" if self.cascade else self.primary.name

    @property
    def digest(self) -> str:
        return f"{self.primary.digest}>{self.segmenter.digest}" if self.cascade else self.primary.digest

    @property
    def models(self) -> list[ModelInfo]:
        return [self.primary] + ([self.segmenter] if self.segmenter else [])

    @property
    def inputs(self) -> list[Preprocess]:
        """The distinct model inputs to decode each image into (one, or two for a cascade)."""
        out: list[Preprocess] = []
        for m in self.models:
            if not any(m.preprocess.same_input(p) for p in out):
                out.append(m.preprocess)
        return out

    def input_index(self, m: ModelInfo) -> int:
        return next(i for i, p in enumerate(self.inputs) if m.preprocess.same_input(p))

    def schema(self) -> pa.Schema:
        fields = [("image_id", pa.string()), ("source_uri", pa.string()), ("model", pa.string()),
                  ("checkpoint", pa.string()), ("scored_at", pa.timestamp("us", tz="UTC")),
                  ("height", pa.int32()), ("width", pa.int32()), *input_stats.fields()]
        if self.cascade:
            fields += [(f"gate_prob_{column_name(c)}", pa.float32()) for c in self.primary.classes]
            fields.append(("flagged", pa.bool_()))
        fields += [(f"prob_{column_name(c)}", pa.float32()) for c in self.final.classes]
        if self.final.segmenter:
            fields += [(f"rle_{column_name(c)}", pa.string()) for c in self.final.classes]
            fields += [(f"area_{column_name(c)}", pa.int64()) for c in self.final.classes]
        fields += [("labels", pa.list_(pa.string())), ("any_defect", pa.bool_()), ("error", pa.string())]
        decision = {"task": self.final.task, "thresholds": list(self.final.thresholds)}
        return pa.schema(fields, metadata={CLASSES_KEY: json.dumps(list(self.final.classes)),
                                           DECISION_KEY: json.dumps(decision)})


def make_plan(sc: ScoreConfig, s3: S3Config | None) -> Plan:
    if not sc.checkpoint:
        raise ScoreError("score.checkpoint: required (a checkpoint folder written by jobs/train.py)")
    min_area = tuple(sc.min_area)  # the final model's: the segmenter's in a cascade
    primary = describe(sc.checkpoint, s3, () if sc.segmenter else min_area, sc.tta)
    segmenter = describe(sc.segmenter, s3, min_area, sc.tta) if sc.segmenter else None
    for key, info in (("checkpoint", primary), ("segmenter", segmenter)):
        if info is None or info.exported == (sc.engine == "onnxruntime"):
            continue
        if info.exported:
            raise ScoreError(f"score.{key} {info.uri}: an exported ONNX model; score it with "
                             "score.engine=onnxruntime, or give the checkpoint folder it came from")
        raise ScoreError(f"score.{key} {info.uri}: score.engine=onnxruntime runs exported models (.onnx "
                         "files): export the checkpoint with jobs/export.py and give the file it writes")
    if segmenter is not None:
        if primary.segmenter:
            raise ScoreError(f"score.checkpoint {sc.checkpoint}: a cascade gate must be a classifier, "
                             "this is a segmenter (give the segmenter as score.segmenter)")
        if not segmenter.segmenter:
            raise ScoreError(f"score.segmenter {sc.segmenter}: not a segmenter checkpoint "
                             f"(task {segmenter.task})")
    final = segmenter or primary
    if sc.min_area and len(sc.min_area) != len(final.classes):
        raise ScoreError(f"score.min_area: one value per class ({', '.join(final.classes)}), "
                         f"got {sc.min_area}")
    if sc.expect_size:
        expect = tuple(sc.expect_size)
    elif "severstal" in (primary.data_format, final.data_format):
        expect = SEVERSTAL_SIZE
    else:
        expect = None
    return Plan(primary, segmenter, expect, tuple(sc.min_area) or final.min_area or (0,) * len(final.classes))


def classify(info: ModelInfo, probs: np.ndarray) -> tuple[list[str], bool]:
    """(labels, any_defect) of one image from a classifier's probabilities and thresholds."""
    if info.task == "multiclass":  # argmax, unless a calibrated class threshold says otherwise
        label = info.classes[int(metrics.decide("multiclass", probs[None], info.thresholds)[0])]
        return [label], label.lower() not in NO_DEFECT_NAMES
    found = [c for c, p, t in zip(info.classes, probs, info.thresholds) if p >= t]
    return found, bool(found)


def gate_classes(gate: ModelInfo, seg: ModelInfo, labels: list[str]) -> list[bool]:
    """Which of the segmenter's classes a flagged sheet may have: per class when the classifier is
    multi-label over the same classes, else all of them."""
    if gate.task == "multilabel" and list(gate.classes) == list(seg.classes):
        return [c in labels for c in seg.classes]
    return [True] * len(seg.classes)
