"""Export to the line: a checkpoint to an ONNX model (the file ``onnx_model`` describes), checked
against PyTorch on real images, and an INT8 model (``quantize``) that must keep its accuracy.

    result = export.run(config.load(None, ["export.checkpoint=runs/neu/epoch-0069"], config.ExportJob))

1. The graph: uint8 (N, H, W, C) sheets at the checkpoint's input size (what the scoring job's decode
   stage gives its model) through ``model_io.normalise`` (the training code's normalisation), the
   network and ``model_io.probabilities``, exported by torch's ONNX exporter with a free batch size;
   the checkpoint's meta.json goes into the file's metadata, so the file decides as the checkpoint does.
2. Parity: PyTorch and ONNX Runtime on the first ``export.parity_images`` images of the checkpoint's
   validation split; the export is refused when a probability differs by more than ``export.tolerance``.
3. INT8 (``export.int8``): static QDQ quantisation calibrated on training-split images, then the gate:
   ``evaluate.run`` (the metrics of ``jobs/evaluate.py``) on the validation split for the checkpoint
   and for the INT8 model; INT8 is refused when its main metric (macro-F1, or Dice for segmenters)
   falls more than ``export.max_drop`` below the checkpoint's.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from steelray import checkpoint, config, data, evaluate, images, model_io, onnx_model, quantize, storage

log = logging.getLogger(__name__)

FP32, INT8, REPORT = "model.onnx", "model.int8.onnx", "export.json"


class ExportError(RuntimeError):
    """An export refused (parity past the tolerance) or impossible as asked; the message says why."""


class Graph(nn.Module):
    """What the exported file computes: uint8 (N, H, W, C) sheets -> probabilities."""

    def __init__(self, model: nn.Module, pre: model_io.Preprocess, task: str):
        super().__init__()
        self.model, self.pre, self.task = model, pre, task

    def forward(self, sheets: torch.Tensor) -> torch.Tensor:
        x = model_io.normalise(sheets.permute(0, 3, 1, 2), self.pre)
        return model_io.probabilities(self.model(x), self.task)


@dataclass
class Export:
    """What ``run`` wrote and measured (``summary()`` is export.json)."""

    checkpoint: str
    out: str
    exported_at: str
    fp32: dict = field(default_factory=dict)   # uri, digest, parity
    int8: dict = field(default_factory=dict)   # uri (absent when refused), calibration, gate

    @property
    def refused(self) -> bool:
        return bool(self.int8.get("refused"))

    def summary(self) -> dict:
        return dataclasses.asdict(self)


def to_onnx(model: nn.Module, meta: dict) -> bytes:
    """The checkpoint's model as an ONNX model (bytes) with ``meta`` in its metadata."""
    pre = model_io.Preprocess.from_dict(meta["preprocess"])
    graph = Graph(model.cpu().eval(), pre, meta["task"]).eval()
    example = torch.zeros((2, *pre.size, pre.in_chans), dtype=torch.uint8)
    program = torch.onnx.export(graph, (example,), input_names=[onnx_model.INPUT], output_names=[onnx_model.OUTPUT],
                                dynamic_shapes={"sheets": {0: torch.export.Dim("batch")}}, dynamo=True,
                                verbose=False)
    return with_meta(program.model_proto.SerializeToString(), meta)


def with_meta(model: bytes, meta: dict) -> bytes:
    """An ONNX model with ``meta`` as its ``steelray.meta`` metadata (replacing any there)."""
    import onnx

    proto = onnx.load_from_string(model)
    kept = [p for p in proto.metadata_props if p.key != onnx_model.META_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    proto.metadata_props.add(key=onnx_model.META_KEY, value=json.dumps(meta))
    proto.producer_name, proto.doc_string = "steelray", f"{meta['model']['name']} {meta['task']}: uint8 NHWC -> probabilities"
    return proto.SerializeToString()


def sheets(uris: list[str], pre: model_io.Preprocess, s3=None) -> np.ndarray:
    """uint8 (N, H, W, C) images at the model's input size, as the scoring job's decode stage makes them."""
    return np.stack([model_io.resize(images.load_image(u, pre.in_chans, s3), pre.size) for u in uris])


def parity(graph: Graph, exported: onnx_model.OnnxModel, batch: np.ndarray, step: int = 16) -> float:
    """The largest probability difference between PyTorch and ONNX Runtime on ``batch``."""
    worst = 0.0
    for i in range(0, len(batch), step):
        with torch.inference_mode():
            want = graph(torch.from_numpy(batch[i:i + step])).numpy()
        worst = max(worst, float(np.abs(exported(batch[i:i + step]) - want).max()))
    return worst


def run(job: config.ExportJob) -> Export:
    if not job.export.checkpoint:
        raise ExportError("export.checkpoint: required (a checkpoint folder written by jobs/train.py)")
    from steelray import registry

    job = dataclasses.replace(job, export=dataclasses.replace(  # models:/<name>@<alias> -> its checkpoint
        job.export, checkpoint=registry.resolve(job.export.checkpoint, job.tracking, job.s3)))
    opts = job.export
    if onnx_model.is_exported(opts.checkpoint):
        raise ExportError(f"export.checkpoint {opts.checkpoint}: already an exported model; give the "
                          "checkpoint folder it came from")
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    out = opts.out or storage.join(opts.checkpoint, "export")
    model, meta = checkpoint.load_model(opts.checkpoint, job.s3)
    pre = model_io.Preprocess.from_dict(meta["preprocess"])
    labelled = evaluate.labelled_set_config(meta, gate_job(job, opts.checkpoint))
    train, val = data.split(data.build_manifest(labelled), labelled.data)
    if not len(val):
        raise ExportError(f"{opts.checkpoint}: no validation images to check the export on")
    result = Export(opts.checkpoint, out, started)

    source = {"checkpoint": opts.checkpoint, "exported_at": started, "torch": torch.__version__}
    fp32 = to_onnx(model, {**meta, "export": {**source, "precision": "fp32"}})
    shown = val.records.uri.tolist()[:opts.parity_images]
    diff = parity(Graph(model, pre, meta["task"]), onnx_model.OnnxModel(fp32, FP32), sheets(shown, pre, job.s3))
    result.fp32["parity"] = {"images": len(shown), "max_abs_diff": diff, "tolerance": opts.tolerance,
                             "from": "validation split"}
    log.info("parity on %d validation images: largest probability difference %.2e (tolerance %.0e)",
             len(shown), diff, opts.tolerance)
    if diff > opts.tolerance:
        _refused(out, (FP32, INT8), result, job)
        raise ExportError(f"export refused: the ONNX model's probabilities differ from PyTorch's by up to "
                          f"{diff:.2e} on {len(shown)} validation images (export.tolerance {opts.tolerance:.0e})")
    fp32 = with_meta(fp32, {**meta, "export": {**source, "precision": "fp32", "parity": result.fp32["parity"]}})
    result.fp32.update(uri=storage.join(out, FP32), digest=hashlib.sha256(fp32).hexdigest()[:16], bytes=len(fp32))
    storage.write_bytes(result.fp32["uri"], fp32, job.s3)

    if opts.int8:
        calib = quantize.calibration_sample(train.records.uri.tolist(), opts.calibration_images, opts.seed)
        result.int8["calibration"] = {"images": len(calib), "from": "training split", "method": opts.calibration}
        int8 = quantize.quantize(fp32, (sheets(part, pre, job.s3) for part in chunks(calib, opts.batch_size)),
                                 opts.calibration)
        result.int8.update(gate(job, meta, int8))
        int8 = with_meta(int8, {**meta, "export": {**source, "precision": "int8", **result.int8}})
        if result.refused:
            _refused(out, (INT8,), result, job)
            return result
        result.int8.update(uri=storage.join(out, INT8), digest=hashlib.sha256(int8).hexdigest()[:16], bytes=len(int8))
        storage.write_bytes(result.int8["uri"], int8, job.s3)
    storage.write_text(storage.join(out, REPORT), json.dumps(result.summary(), indent=1), job.s3)
    return result


def _refused(out: str, names: tuple[str, ...], result: Export, job: config.ExportJob) -> None:
    """The figures of a refused export, and no model of that kind left in ``out`` from an earlier
    export (it would pass for this checkpoint's)."""
    for name in names:
        if storage.isfile(storage.join(out, name), job.s3):
            storage.remove(storage.join(out, name), job.s3)
            log.warning("removed %s: an earlier export's, not this checkpoint's", storage.join(out, name))
    storage.write_text(storage.join(out, REPORT), json.dumps(result.summary(), indent=1), job.s3)


def gate(job: config.ExportJob, meta: dict, int8: bytes) -> dict:
    """The accuracy gate: ``evaluate.run`` on the checkpoint and on the INT8 model (from a scratch
    scratch file), same images, same thresholds; INT8 refused past ``export.max_drop``."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, INT8)
        with open(path, "wb") as f:
            f.write(with_meta(int8, {**meta, "export": {"precision": "int8"}}))
        base = evaluate.run(gate_job(job, job.export.checkpoint))
        quant = evaluate.run(gate_job(job, path))
    metric = base.metric
    drop = base.before[metric] - quant.before[metric]
    figures = {"metric": metric, "pytorch": base.before[metric], "int8": quant.before[metric], "drop": drop,
               "max_drop": job.export.max_drop, "images": len(base.manifest), "from": "validation split",
               "refused": bool(drop > job.export.max_drop)}
    log.info("INT8 gate: %s %.4f (PyTorch %.4f) on %d validation images: drop %.4f, at most %.4f: %s", metric,
             figures["int8"], figures["pytorch"], figures["images"], drop, job.export.max_drop,
             "refused" if figures["refused"] else "passed")
    return figures


def gate_job(job: config.ExportJob, model: str) -> config.EvaluateJob:
    """The evaluation behind the gate and the parity images: the validation split, no robustness passes."""
    return config.EvaluateJob(evaluate=config.EvaluateConfig(checkpoint=model, split="val", robustness=False,
                                                             device="cpu", batch_size=job.export.batch_size),
                              data=dict(job.data), s3=job.s3)


def chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]
