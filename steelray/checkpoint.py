"""Checkpoints that scoring and evaluation can use with nothing else, and that load without Ray.

A checkpoint is a folder (local or s3://):
    model.safetensors  the weights (safetensors: loading never unpickles anything)
    meta.json          task, class names, per-class thresholds, preprocessing, the full config
                       (secrets masked), epoch and validation metrics
    train_state.pt     optimizer/scheduler/epoch state for resuming (tensors only, weights_only=True)
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from steelray import config as config_mod
from steelray import models, storage
from steelray.model_io import Preprocess
from steelray.storage import S3Config

WEIGHTS, META, STATE = "model.safetensors", "meta.json", "train_state.pt"
REFERENCE = "reference.parquet"  # validation probabilities (evaluate.keep_reference): the drift reference


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (or any ``.module`` wrapper)."""
    return getattr(model, "module", model)


def write(folder: str, model: nn.Module, meta: dict, train_state: dict | None = None) -> None:
    """Write a checkpoint into a local ``folder``."""
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    save_file(state, os.path.join(folder, WEIGHTS))
    with open(os.path.join(folder, META), "w") as f:
        json.dump(meta, f, indent=1)
    if train_state is not None:
        torch.save(train_state, os.path.join(folder, STATE))


def make_meta(cfg: config_mod.Config, classes: list[str], preprocess: Preprocess, *,
              thresholds: list[float] | None = None, epoch: int = 0, metrics: dict | None = None,
              run_id: str = "") -> dict:
    """``run_id``: the MLflow run that trained it (``tracking.uri`` in the config names the server),
    where an evaluation of the checkpoint logs its report."""
    meta = {"format": "steelray-checkpoint/1", "task": cfg.task, "classes": list(classes),
            "thresholds": thresholds or [0.5] * models.num_outputs(cfg.task, len(classes)),
            "preprocess": preprocess.to_dict(), "model": {"name": cfg.model.name, "arch": cfg.model.arch},
            "epoch": epoch, "metrics": metrics or {}, "config": config_mod.to_dict(cfg)}
    return {**meta, "mlflow_run_id": run_id} if run_id else meta


def read_meta(uri: str, s3: S3Config | None = None) -> dict:
    try:
        return json.loads(storage.read_text(storage.join(uri, META), s3))
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: not a steelray checkpoint (no {META})") from None


def load_model(uri: str, s3: S3Config | None = None, device: str = "cpu") -> tuple[nn.Module, dict]:
    """The trained ``nn.Module`` (eval mode) and its meta, from a checkpoint folder or s3:// prefix."""
    meta = read_meta(uri, s3)
    cfg = config_mod.from_dict(meta["config"])
    model = models.build_model(cfg, len(meta["classes"]), load_pretrained=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, WEIGHTS)
        with open(path, "wb") as f:
            f.write(storage.read_bytes(storage.join(uri, WEIGHTS), s3))
        model.load_state_dict(load_file(path, device="cpu"))
    return model.to(device).eval(), meta


def load_train_state(folder: str) -> dict | None:
    path = os.path.join(folder, STATE)
    return torch.load(path, map_location="cpu", weights_only=True) if os.path.exists(path) else None
