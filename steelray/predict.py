"""Applying a model to a labelled set, as the scoring actor applies it: every image decoded,
resized and normalised through ``model_io``, optionally under one of ``conditions``. A model is a
checkpoint's ``nn.Module`` or an exported model (``onnx_model.OnnxModel``): evaluation, its report
and the export's accuracy gate run either.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from steelray import checkpoint, conditions, config, data, ensemble, images, metrics, model_io, onnx_model, rle

PIXEL_THRESHOLDS = np.round(np.arange(0.1, 0.95, 0.05), 2)     # segmenter calibration candidates


def read_meta(uri: str, s3=None) -> dict:
    """The meta of a checkpoint folder, the one an exported model carries, or an ensemble's."""
    if onnx_model.is_exported(uri):
        return onnx_model.read_meta(uri, s3)
    if ensemble.is_ensemble(uri, s3):
        return ensemble.meta(uri, s3)
    return checkpoint.read_meta(uri, s3)


def load_model(job: config.EvaluateJob, uri: str = ""):
    """``evaluate.checkpoint`` (or ``uri``) as a model to apply: an exported model in ONNX Runtime,
    the checkpoint's module on ``evaluate.device``, or an ensemble's members (``Members``)."""
    uri = uri or job.evaluate.checkpoint
    if onnx_model.is_exported(uri):
        return onnx_model.load(uri, job.s3, device=device_of(job))
    if ensemble.is_ensemble(uri, job.s3):
        spec = ensemble.read(uri, job.s3)
        members, route = ensemble.member_uris(uri, spec), ensemble.route_of(uri, spec)
        return Members([load_model(job, m) for m in members], [read_meta(m, job.s3) for m in members],
                       route and (load_model(job, route[0]), read_meta(route[0], job.s3), route[1]))
    return checkpoint.load_model(uri, job.s3, device=device_of(job))[0]


class Members:
    """An ensemble's loaded members and their metas: ``sheet_probabilities`` averages them; ``route``:
    (model, meta, black share) that reads the clipped images instead, where the ensemble routes them."""

    def __init__(self, models: list, metas: list[dict], route: tuple | None = None):
        self.models, self.metas, self.route = models, metas, route


def _probabilities(model, meta: dict, x, tta: str):
    """A model's probabilities for a uint8 NCHW CPU batch ``x``, averaged over ``tta``'s views; an
    ensemble's, the mean of its members' (its route's model's, for the images it routes)."""
    segmenter = meta["task"] == "segmentation"
    if isinstance(model, Members):
        out = sum(_probabilities(m, mm, x, tta) for m, mm in zip(model.models, model.metas)) / len(model.models)
        if model.route is not None:
            clipped = torch.from_numpy(ensemble.black_share(x.numpy()) > model.route[2])
            if clipped.any():
                out[clipped.to(out.device)] = _probabilities(model.route[0], model.route[1], x[clipped], tta).to(out.dtype)
        return out
    if isinstance(model, onnx_model.OnnxModel):  # the exported graph takes NHWC and normalises itself
        return torch.from_numpy(model_io.with_tta(model, x.permute(0, 2, 3, 1).numpy(), tta, 1, segmenter))
    pre = model_io.Preprocess.from_dict(meta["preprocess"])
    return model_io.with_tta(lambda v: model_io.probabilities(model(model_io.model_input(v, pre)), meta["task"]),
                             x.to(next(model.parameters()).device), tta, 2, segmenter)


def route_gate(uri: str, s3=None, batch_size: int = 64) -> float:
    """A route's share for ensembles with the model at ``uri``: the largest black share (at its
    input, as the ensemble measures it) of the images it was trained on, clean or under each
    condition of ``conditions`` but crushed. No image of the evaluated split takes part."""
    from steelray import evaluate  # evaluate imports this module

    meta = read_meta(uri, s3)
    cfg = evaluate.labelled_set_config(meta, config.EvaluateJob(s3=s3 or config.S3Config()))
    train_m, _ = data.split(data.build_manifest(cfg, cfg.s3), cfg.data)
    pre, uris, most = model_io.Preprocess.from_dict(meta["preprocess"]), list(train_m.records.uri), 0.0
    for condition in (None, *(c for c in conditions.CONDITIONS if c != "crushed")):
        for x, *_ in DataLoader(EvalImages(uris, pre, condition, s3), batch_size=batch_size):
            most = max(most, float(ensemble.black_share(x.numpy()).max()))
    return most


def device_of(job: config.EvaluateJob) -> str:
    if job.evaluate.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return job.evaluate.device


class EvalImages(Dataset):
    """Images by URI, optionally perturbed (robustness), resized as the checkpoint says (uint8 CxHxW),
    with their index and original size."""

    def __init__(self, uris: list[str], pre: model_io.Preprocess, perturb: str | None = None, s3=None):
        self.uris, self.pre, self.perturb, self.s3 = uris, pre, perturb, s3

    def __len__(self):
        return len(self.uris)

    def __getitem__(self, i):
        image = images.load_image(self.uris[i], self.pre.in_chans, self.s3)
        h, w = image.shape[:2]
        if self.perturb is not None:
            image = conditions.perturb_image(image, self.perturb, seed=i)
        return model_io.to_chw(model_io.resize(image, self.pre.size)), i, h, w


@torch.no_grad()
def sheet_probabilities(model, meta: dict, manifest: data.Manifest, job: config.EvaluateJob, perturb: str | None = None):
    """``(index, height, width, probabilities)`` for each image of ``manifest`` in order, through
    ``model_io`` as the scoring actor does it: a classifier's (C,), a segmenter's (C, h, w) at the
    model's input size (``model_io.masks`` takes them to the sheet's size), averaged over the
    test-time views ``evaluate.tta`` names."""
    pre = model_io.Preprocess.from_dict(meta["preprocess"])
    loader = DataLoader(EvalImages(list(manifest.records.uri), pre, perturb, job.s3), batch_size=job.evaluate.batch_size,
                        num_workers=job.evaluate.loader_workers)
    for x, idx, hs, ws in loader:
        probs = _probabilities(model, meta, x, job.evaluate.tta)
        for j, i in enumerate(idx.tolist()):
            yield i, int(hs[j]), int(ws[j]), probs[j]


def predict(model, meta: dict, manifest: data.Manifest, job: config.EvaluateJob, perturb: str | None = None) -> np.ndarray:
    """Probabilities: (N,) binary, (N, C) multilabel (sigmoid) or multiclass (softmax)."""
    probs = np.stack([p.cpu().numpy() for *_, p in sheet_probabilities(model, meta, manifest, job, perturb)])
    return probs[:, 0] if meta["task"] == "binary" else probs


def predict_masks(model, meta: dict, manifest: data.Manifest, job: config.EvaluateJob, perturb: str | None = None) -> dict:
    """Per (image, class): areas and overlaps at every candidate threshold, at the image's own size."""
    rles = list(manifest.records.rles)
    parts = []
    for i, h, w, probs in sheet_probabilities(model, meta, manifest, job, perturb):
        full = model_io.at_size(probs, h, w).cpu().numpy()
        truth = np.stack([rle.decode(r, (h, w)) for r in rles[i]]).astype(bool)
        parts.append(metrics.mask_stats(full, truth, PIXEL_THRESHOLDS))
    stats = {k: np.stack([p[k] for p in parts]) for k in parts[0]}
    stats["candidates"] = PIXEL_THRESHOLDS
    return stats
