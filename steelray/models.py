"""The networks: timm classifiers, smp segmenters and a small plain CNN. Pure torch; never imports Ray,
so scoring, export and evaluation load the same modules without Ray Train.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import torch
from torch import nn

from steelray.config import Config, ModelConfig
from steelray.model_io import Preprocess


class ModelError(ValueError):
    """A model that cannot be built as configured."""


def num_outputs(task: str, num_classes: int) -> int:
    return 1 if task == "binary" else num_classes


def build_model(cfg: Config, num_classes: int, *, load_pretrained: bool = True) -> nn.Module:
    """The network for ``cfg.task``; ``load_pretrained=False`` skips hub/file weights (used when
    a checkpoint's weights are about to be loaded anyway)."""
    m, in_chans = cfg.model, cfg.data.in_chans
    out = num_outputs(cfg.task, num_classes)
    pretrained = m.pretrained and load_pretrained
    if cfg.task == "segmentation":
        model = _segmenter(m, in_chans, out, pretrained)
    elif m.name == "simple_cnn":
        if pretrained:
            raise ModelError("model.pretrained: simple_cnn has no pretrained weights; set it to false")
        model = SimpleCNN(in_chans, out, m.dropout)
    else:
        model = _classifier(m, in_chans, out, pretrained)
    freeze_stages(model, m.freeze_stages, m.name)
    return model


def preprocess_for(cfg: Config) -> Preprocess:
    """Input size and normalisation: the model's own (timm's pretrained config), reduced to one
    channel for grayscale input; a neutral 0.5/0.25 for the plain CNN."""
    in_chans = cfg.data.in_chans
    if cfg.model.name == "simple_cnn":
        mean, std = (0.5,) * in_chans, (0.25,) * in_chans
    else:
        import timm

        name = cfg.model.name.removeprefix("tu-")
        try:
            pc = timm.models.get_pretrained_cfg(name) or timm.models.get_pretrained_cfg(
                timm.models.get_arch_name(name))
        except Exception:
            pc = None
        mean3, std3 = (tuple(pc.mean), tuple(pc.std)) if pc else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        if in_chans == 1:
            mean, std = (sum(mean3) / 3,), (sum(std3) / 3,)
        else:
            mean, std = mean3, std3
    crop = tuple(cfg.input.crop) if cfg.input.crop else None
    return Preprocess(tuple(cfg.input.size), crop, in_chans, tuple(mean), tuple(std), cfg.input.normalize)


class SimpleCNN(nn.Module):
    """A small plain CNN baseline: four conv-BN-ReLU-pool stages, global pooling, dropout, linear."""

    def __init__(self, in_chans: int, num_outputs: int, dropout: float = 0.0, width: int = 32):
        super().__init__()
        chans = [in_chans, width, width * 2, width * 4, width * 8]
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True),
                          nn.Conv2d(b, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True),
                          nn.MaxPool2d(2))
            for a, b in zip(chans, chans[1:]))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(chans[-1], num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.head(x)


def _classifier(m: ModelConfig, in_chans: int, out: int, pretrained: bool) -> nn.Module:
    import timm

    kwargs = dict(num_classes=out, in_chans=in_chans, drop_rate=m.dropout)
    if not timm.is_model(m.name):
        raise ModelError(f"model.name: {m.name!r} is not a timm model (nor simple_cnn); "
                         "e.g. resnet50, efficientnet_b0, mobilenetv3_large_100 (timm.list_models())")
    if not pretrained:
        return timm.create_model(m.name, pretrained=False, **kwargs)
    if m.weights:
        with _local_copy(m.weights) as path:
            return timm.create_model(m.name, pretrained=True, pretrained_cfg_overlay={"file": path}, **kwargs)
    try:
        return timm.create_model(m.name, pretrained=True, **kwargs)
    except Exception as e:  # no network to the hub, or no weights published for this name
        raise ModelError(f"model.pretrained: could not download {m.name} weights from the hub ({e}); "
                         "on an offline cluster set model.weights to a local or s3:// weights file, "
                         "or set model.pretrained=false") from None


def _segmenter(m: ModelConfig, in_chans: int, out: int, pretrained: bool) -> nn.Module:
    import segmentation_models_pytorch as smp

    archs = {"unet": smp.Unet, "fpn": smp.FPN}
    weights = "imagenet" if pretrained and not m.weights else None
    try:
        model = archs[m.arch](encoder_name=m.name, encoder_weights=weights, in_channels=in_chans, classes=out)
    except KeyError as e:
        raise ModelError(f"model.name: {m.name!r} is not an smp encoder ({e}); e.g. resnet18, resnet34, "
                         "efficientnet-b0, or any timm model as tu-<name>") from None
    except Exception as e:
        if weights:
            raise ModelError(f"model.pretrained: could not download {m.name} encoder weights ({e}); set "
                             "model.weights to a local or s3:// file, or model.pretrained=false") from None
        raise
    if pretrained and m.weights:
        with _local_copy(m.weights) as path:
            state = _load_state_file(path)
        missing, unexpected = model.encoder.load_state_dict(state, strict=False)
        if len(unexpected) == len(state):
            raise ModelError(f"model.weights: {m.weights} holds no weights for encoder {m.name}")
    return model


def freeze_stages(model: nn.Module, n: int, name: str = "") -> None:
    """Freeze the stem and the first ``n`` stages (0 freezes nothing). Stages are timm's
    ``feature_info`` modules, the plain CNN's ``stages``, or a ResNet-style encoder's layers."""
    if n == 0:
        return
    target = getattr(model, "encoder", model)  # smp: freeze within the encoder
    if isinstance(target, SimpleCNN):
        boundaries = [f"stages.{i}" for i in range(len(target.stages))]
    elif hasattr(target, "feature_info"):
        info = target.feature_info
        boundaries = [f["module"] for f in (info.info if hasattr(info, "info") else info)]
    elif all(hasattr(target, a) for a in ("conv1", "layer1", "layer4")):
        boundaries = ["bn1", "layer1", "layer2", "layer3", "layer4"]
    else:
        raise ModelError(f"model.freeze_stages: cannot tell the stages of {name or type(target).__name__}")
    if n > len(boundaries):
        raise ModelError(f"model.freeze_stages: {name} has {len(boundaries)} stages, got {n}")
    params = list(target.named_parameters())
    # Modules register in forward order: freeze everything before the first weight of stage n+1
    # (or, for n = all stages, everything up to the last stage's weights; the head stays trainable).
    def in_stage(name: str, stages: list[str]) -> bool:
        return any(name == b or name.startswith(b + ".") for b in stages)

    later = [i for i, (p, _) in enumerate(params) if in_stage(p, boundaries[n:])]
    stop = later[0] if later else 1 + max(i for i, (p, _) in enumerate(params) if in_stage(p, boundaries))
    for _, p in params[:stop]:
        p.requires_grad_(False)


def _load_state_file(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state


@contextlib.contextmanager
def _local_copy(uri: str):
    """A local path for a weights file that may live on S3 (downloaded to a temp file)."""
    from steelray import storage

    if not storage.is_s3(uri):
        path = os.path.expanduser(uri)
        if not os.path.exists(path):
            raise ModelError(f"model.weights: {uri} not found")
        yield path
        return
    try:
        blob = storage.read_bytes(uri)
    except FileNotFoundError:
        raise ModelError(f"model.weights: {uri} not found") from None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, os.path.basename(uri))
        with open(path, "wb") as f:
            f.write(blob)
        yield path
