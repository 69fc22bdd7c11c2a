"""Training's augmentation presets: albumentations pipelines on uint8 images (mask-aware for
segmentation), between ``model_io.resize`` (or a random full-resolution crop, with ``input.crop``)
and ``model_io.model_input``. Evaluation and scoring use no preset.
"""

from __future__ import annotations

import os
import random

import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations asks PyPI on import otherwise
import albumentations as A  # noqa: E402

from steelray.model_io import Preprocess  # noqa: E402

PRESETS = ("none", "light", "medium", "strong", "robust", "dark")
UNDEREXPOSURE = (0.4, 0.4)  # the robust preset's under-exposure unless the config says: (share, depth)


def build(pre: Preprocess, augment: str = "none", turns: bool = True, seed: int | None = None,
          dark: tuple[float, float] = UNDEREXPOSURE) -> A.Compose:
    """Training's pipeline: ``pipeline(image=HxWxC uint8[, mask=HxWxK])`` -> the same, augmented;
    a random crop first where ``pre.crop`` is set (the image is then taken at full resolution).
    ``turns``: 90-degree turns of square images (medium and up); off, a sheet keeps its orientation.
    ``seed``: the pipeline's random stream (``reseed``; albumentations ignores the global seeds);
    None draws a fresh one, so two runs augment differently.
    ``dark``: the ``robust`` preset's under-exposure, (share of images, depth): ``underexposure``;
    the ``dark`` preset under-exposes every image to that depth, then draws ``medium``."""
    if augment not in PRESETS:
        raise ValueError(f"unknown augmentation preset {augment!r}; choose one of {', '.join(PRESETS)}")
    steps: list = []
    if pre.crop:
        ch, cw = pre.crop
        steps += [A.PadIfNeeded(ch, cw), A.RandomCrop(ch, cw)]
    size = pre.crop or pre.size
    steps += _augmentations(augment, turns and size[0] == size[1], dark)
    pipeline = A.Compose(steps)
    if seed is not None:
        reseed(pipeline, seed)
    return pipeline


def reseed(pipeline: A.Compose, seed: int) -> None:
    """One random stream from ``seed`` shared by every step of ``pipeline``, so each draws on from
    the last. (albumentations' own ``Compose(seed=)`` gives each step a generator of that same seed:
    every step then draws the same numbers, both flips always together.)"""
    pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))


def underexposure(p: float, depth: float = 0.4) -> A.OneOf:
    """Under-exposed sheets, on a share ``p`` of images: a darker exposure whose shadows clip to
    black (brightness -(depth - 0.3)..-depth of full scale with contrast 0..-depth; the default
    depth 0.4: -10..-40%, contrast 0..-40%), or a steeper gamma (1.5-3) that sinks the dark half."""
    brightness = (-depth, round(0.3 - depth, 6))  # rounded: the default depth gives exactly (-0.4, -0.1)
    return A.OneOf([A.RandomBrightnessContrast(brightness_limit=brightness, contrast_limit=(-depth, 0.0), p=1),
                    A.RandomGamma(gamma_limit=(150, 300), p=0.5)], p=p)


def _augmentations(preset: str, turn: bool, dark: tuple[float, float]) -> list:
    if preset == "none":
        return []
    if preset == "dark":  # a model for clipped sheets (an ensemble's route): every image under-exposed
        return [underexposure(1.0, dark[1]), *_augmentations("medium", turn, dark)]
    out = [A.HorizontalFlip()]
    if preset in ("medium", "strong", "robust"):
        robust = preset == "robust"  # medium, plus the field's lighting range (+-30%), blur, sensor noise
        #                              and under-exposure with clipped shadows
        limit, p = (0.3, 0.6) if robust else (0.2, 0.5)
        out += [A.VerticalFlip(), A.RandomBrightnessContrast(limit, limit, p=p)]
        if robust:
            out += [A.GaussianBlur(blur_limit=0, sigma_limit=(0.5, 2.0), p=0.25),
                    A.GaussNoise(std_range=(0.02, 0.1), p=0.25), underexposure(*dark)]
        if turn:
            out.append(A.RandomRotate90())
    if preset == "strong":
        out += [A.CLAHE(p=0.3), A.Affine(scale=(0.9, 1.1), translate_percent=0.05, rotate=(-5, 5), p=0.5),
                A.GaussNoise(p=0.3), A.GaussianBlur(blur_limit=(3, 5), p=0.2)]
    return out
