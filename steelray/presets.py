"""Image transforms, built from a checkpoint's ``Preprocess`` plus an augmentation preset.

Training: random full-resolution crops (``crop``) or a resize to ``size``, then the preset's
augmentations (mask-aware for segmentation). Evaluation and scoring: resize to ``size`` only.
"""

from __future__ import annotations

import os

import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations asks PyPI on import otherwise
import albumentations as A  # noqa: E402

from steelray.preprocess import Preprocess  # noqa: E402

PRESETS = ("none", "light", "medium", "strong", "robust")


def build(pre: Preprocess, augment: str = "none", train: bool = False) -> A.Compose:
    """An albumentations pipeline: ``pipeline(image=HxWxC uint8[, mask=HxWxK])`` -> normalised float32."""
    if augment not in PRESETS:
        raise ValueError(f"unknown augmentation preset {augment!r}; choose one of {', '.join(PRESETS)}")
    steps: list = []
    if train and pre.crop:
        ch, cw = pre.crop
        steps += [A.PadIfNeeded(ch, cw), A.RandomCrop(ch, cw)]
    else:
        steps.append(A.Resize(*pre.size))
    if train:
        steps += _augmentations(augment, square=(pre.crop or pre.size)[0] == (pre.crop or pre.size)[1])
    if pre.normalize == "image":  # (x - mean) / (std + 1e-4) over the whole image, clipped to +-20
        steps.append(A.Normalize(normalization="image"))
    else:
        steps.append(A.Normalize(mean=pre.mean, std=pre.std, max_pixel_value=255.0))
    return A.Compose(steps)


def _augmentations(preset: str, square: bool) -> list:
    if preset == "none":
        return []
    out = [A.HorizontalFlip()]
    if preset in ("medium", "strong", "robust"):
        robust = preset == "robust"  # medium, plus the field's lighting range (+-30%), blur and sensor noise
        limit, p = (0.3, 0.6) if robust else (0.2, 0.5)
        out += [A.VerticalFlip(), A.RandomBrightnessContrast(limit, limit, p=p)]
        if robust:
            out += [A.GaussianBlur(blur_limit=0, sigma_limit=(0.5, 2.0), p=0.25),
                    A.GaussNoise(std_range=(0.02, 0.1), p=0.25)]
        if square:
            out.append(A.RandomRotate90())
    if preset == "strong":
        out += [A.CLAHE(p=0.3), A.Affine(scale=(0.9, 1.1), translate_percent=0.05, rotate=(-5, 5), p=0.5),
                A.GaussNoise(p=0.3), A.GaussianBlur(blur_limit=(3, 5), p=0.2)]
    return out


def normalize_batch(x, pre: Preprocess):
    """What ``build``'s last step does, for a uint8 NCHW torch batch on any device (scoring
    normalises on the GPU, after the uint8 images have crossed the bus)."""
    import torch

    x = x.float()
    if pre.normalize == "image":  # albumentations' Normalize(normalization="image")
        std, mean = torch.std_mean(x, dim=(1, 2, 3), keepdim=True, correction=0)
        return ((x - mean) / (std + 1e-4)).clamp_(-20, 20)
    mean = torch.tensor(pre.mean, device=x.device).view(1, -1, 1, 1) * 255
    std = torch.tensor(pre.std, device=x.device).view(1, -1, 1, 1) * 255
    return (x - mean) / std


def to_chw(image: np.ndarray) -> np.ndarray:
    """HxWxC float32 -> CxHxW, contiguous (what the network takes)."""
    return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
