"""What an image goes through on its way into a model, and what its outputs become: the one home
that training, evaluation, the report and the scoring actor all call.

    image (uint8 HxWxC, decoded by ``images.decode_image``)
      -> resize(image, pre)                       CPU, OpenCV bilinear, still uint8
      -> model_input(batch, pre)                  uint8 NCHW on any device -> normalised float, channels_last
      -> model -> probabilities(logits, task)     sigmoid, or softmax for a multi-class classifier
      -> masks(probs, height, width, ...)         segmenters: back to the sheet's own size, per-class
                                                  pixel threshold and minimum area
    with_tta(run, batch, mode, ...)               test-time augmentation: the model's probabilities
                                                  averaged over flipped (and turned) views

``Preprocess`` is what a checkpoint stores of this (size, channels, normalisation), so scoring
rebuilds it from the checkpoint and never restates it. Torch is imported inside the functions that
need it: scoring's decode workers import this module for ``resize`` alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


NORMALIZATIONS = ("dataset", "image", "center", "equalize")  # what ``normalise`` knows (config's input.normalize)


@dataclass(frozen=True)
class Preprocess:
    """What an image goes through before the model: stored in every checkpoint, rebuilt by scoring."""

    size: tuple[int, int]          # (height, width) of the model's input at evaluation
    crop: tuple[int, int] | None   # random crop (height, width) for training at full resolution
    in_chans: int
    mean: tuple[float, ...]        # per channel, on a 0..1 scale (normalize "dataset")
    std: tuple[float, ...]
    normalize: str = "dataset"     # "image": each image's own mean and std instead (all channels);
                                   # "center": each image's own mean, the fixed std;
                                   # "equalize": each pixel to its rank among its image's pixels

    def __post_init__(self):
        if self.normalize not in NORMALIZATIONS:  # e.g. a checkpoint written by a newer steelray
            raise ValueError(f"preprocess normalize {self.normalize!r}: this steelray knows "
                             f"{', '.join(NORMALIZATIONS)}; the model would get wrongly normalised pixels")

    def to_dict(self) -> dict:
        return {"size": list(self.size), "crop": list(self.crop) if self.crop else None,
                "in_chans": self.in_chans, "mean": list(self.mean), "std": list(self.std),
                "normalize": self.normalize}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(tuple(d["size"]), tuple(d["crop"]) if d.get("crop") else None, d["in_chans"],
                   tuple(d["mean"]), tuple(d["std"]), d.get("normalize", "dataset"))

    def same_input(self, other: Preprocess) -> bool:
        """Whether two models take the same decoded pixels (normalisation happens later, per model)."""
        return tuple(self.size) == tuple(other.size) and self.in_chans == other.in_chans


def resize(image: np.ndarray, size) -> np.ndarray:
    """A uint8 HxWxC image at ``size`` (height, width): OpenCV's bilinear, as albumentations' Resize."""
    size = tuple(size)
    if image.shape[:2] == size:
        return image
    import cv2

    out = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return out.reshape(*size, image.shape[2]) if image.ndim == 3 else out


def resize_mask(mask: np.ndarray, size) -> np.ndarray:
    """A HxWxK 0/1 mask at ``size``: nearest neighbour, so it stays 0/1 (training's targets)."""
    size = tuple(size)
    if mask.shape[:2] == size:
        return mask
    import cv2

    out = cv2.resize(mask, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
    return out.reshape(*size, mask.shape[2])


def to_chw(image: np.ndarray):
    """A uint8 HxWxC image as the CxHxW tensor a DataLoader batches (still uint8: 4x less to move).
    A read-only image (PIL lends its decoded pixels read-only; at the model's own size nothing
    resizes them) is copied: the tensor may be written to, and torch warns of undefined behaviour."""
    import torch

    chw = np.ascontiguousarray(image.transpose(2, 0, 1))
    return torch.from_numpy(chw if chw.flags.writeable else chw.copy())


def normalise(x, pre: Preprocess):
    """A uint8 NCHW batch (any device) as float32, normalised as ``pre`` says. The exported ONNX
    model (``steelray.export``) holds these same operations in its graph."""
    import torch

    if pre.normalize == "equalize":  # histogram equalisation: each pixel to the share of its image's
        # pixels (all channels) darker than it, centred and scaled as a uniform 0..1 (std 1/sqrt 12).
        # Any brightening, dimming or contrast change (a rising map of the grey levels) leaves the
        # ranks as they were; an under-exposure that clips shadows to black leaves every pixel still
        # lit where it was and sends the clipped ones to 0, where the darkest pixels were anyway.
        flat = x.reshape(x.shape[0], -1).long()
        counts = torch.zeros(x.shape[0], 256, device=x.device).scatter_add_(
            1, flat, torch.ones(flat.shape, device=x.device))
        below = (counts.cumsum(1) - counts).gather(1, flat) / flat.shape[1]
        return ((below - 0.5) * 12 ** 0.5).reshape(x.shape)
    x = x.float()
    if pre.normalize == "image":  # each image to zero mean and unit std over all its pixels, clipped
        std, mean = torch.std_mean(x, dim=(1, 2, 3), keepdim=True, correction=0)
        return ((x - mean) / (std + 1e-4)).clamp(-20, 20)
    std = torch.tensor(pre.std, device=x.device).view(1, -1, 1, 1) * 255
    if pre.normalize == "center":  # each image's own mean (over all its pixels) off, the fixed std kept
        return (x - x.mean(dim=(1, 2, 3), keepdim=True)) / std
    mean = torch.tensor(pre.mean, device=x.device).view(1, -1, 1, 1) * 255
    return (x - mean) / std


def model_input(x, pre: Preprocess, dtype=None):
    """A uint8 NCHW batch (any device) as the model takes it: normalised as ``pre`` says, float32
    (or ``dtype``), channels_last."""
    import torch

    x = normalise(x, pre)
    # Always the same strides for the same shape (a size-1 channel dim leaves them ambiguous): a
    # compiled model recompiles for other strides.
    out = torch.empty(x.shape, dtype=dtype or torch.float32, device=x.device, memory_format=torch.channels_last)
    return out.copy_(x)


def probabilities(logits, task: str):
    """Logits as probabilities, in float32: softmax over the classes of a multi-class classifier,
    else a sigmoid per output (binary, multi-label, and each pixel of a segmenter's masks)."""
    logits = logits.float()
    return logits.softmax(1) if task == "multiclass" else logits.sigmoid()


def at_size(probs, height: int, width: int):
    """A segmenter's (C, h, w) probabilities at the sheet's own size (C, height, width), bilinear
    (half-pixel centres): torch's on a tensor, OpenCV's on a NumPy array (an exported model's), the
    same sampling."""
    if tuple(probs.shape[-2:]) == (height, width):
        return probs
    if isinstance(probs, np.ndarray):
        import cv2

        out = cv2.resize(np.ascontiguousarray(probs.transpose(1, 2, 0)), (width, height),
                         interpolation=cv2.INTER_LINEAR)
        return out.reshape(height, width, -1).transpose(2, 0, 1)
    import torch.nn.functional as F

    return F.interpolate(probs[None], size=(height, width), mode="bilinear", align_corners=False)[0]


def masks(probs, height: int, width: int, thresholds, min_area) -> list[np.ndarray]:
    """A segmenter's (C, h, w) probabilities for one sheet as one boolean mask per class at the
    sheet's own size: pixels at or above the class's threshold, and none at all where fewer than
    the class's minimum area are."""
    full = at_size(probs, height, width)
    out = []
    for c in range(full.shape[0]):
        mask = full[c] >= float(thresholds[c])
        mask = mask if isinstance(mask, np.ndarray) else mask.cpu().numpy()
        if mask.sum() < int(min_area[c]):
            mask = np.zeros_like(mask)
        out.append(mask)
    return out


# --- test-time augmentation ---------------------------------------------------------------------
# A view is (transpose, flip rows, flip columns), applied in that order; its inverse undoes them in
# the reverse order. "flips": the four views the flips of the two axes make (every data set:
# Severstal sheets are as valid upside down and mirrored); "dihedral": those and their transposes,
# the eight symmetries of a square (NEU's images, which have no up or left either). Transposing
# needs a square input.
TTA_VIEWS = {"none": [(False, False, False)],
             "flips": [(False, v, h) for v in (False, True) for h in (False, True)],
             "dihedral": [(t, v, h) for t in (False, True) for v in (False, True) for h in (False, True)]}


def _flip(x, axis: int):
    return np.flip(x, axis) if isinstance(x, np.ndarray) else x.flip(axis)


def _transpose(x, a: int, b: int):
    return np.swapaxes(x, a, b) if isinstance(x, np.ndarray) else x.transpose(a, b)


def view(x, v: tuple[bool, bool, bool], rows: int):
    """Batch ``x`` (a tensor or a NumPy array) seen through view ``v``; ``rows`` is the axis of image
    rows (2 in NCHW, 1 in NHWC), columns the next."""
    t, flip_rows, flip_cols = v
    if t:
        x = _transpose(x, rows, rows + 1)
    if flip_rows:
        x = _flip(x, rows)
    return _flip(x, rows + 1) if flip_cols else x


def unview(y, v: tuple[bool, bool, bool]):
    """A segmenter's (N, C, h, w) output for view ``v`` back in the original orientation."""
    t, flip_rows, flip_cols = v
    if flip_cols:
        y = _flip(y, 3)
    if flip_rows:
        y = _flip(y, 2)
    return _transpose(y, 2, 3) if t else y


def trained_turned(meta: dict) -> bool:
    """Whether training turned the model's images by 90 degrees (``input.turns``; true before it existed)."""
    return bool(meta.get("config", {}).get("input", {}).get("turns", True))


def check_tta(mode: str, pre: Preprocess, name: str, turned: bool = True) -> None:
    """Raise ValueError where ``mode`` cannot apply to a model with input ``pre`` (``name`` says whose);
    ``turned``: its training turned images (``trained_turned``), without which dihedral is refused."""
    if mode not in TTA_VIEWS:
        raise ValueError(f"{name}: tta {mode!r} is not one of {', '.join(TTA_VIEWS)}")
    if mode == "dihedral" and pre.size[0] != pre.size[1]:
        raise ValueError(f"{name}: tta dihedral turns images by 90 degrees, which needs a square input; "
                         f"this model's is {pre.size[0]}x{pre.size[1]} (use flips)")
    if mode == "dihedral" and not turned:
        raise ValueError(f"{name}: tta dihedral turns images by 90 degrees, and this model was trained "
                         "without turns (input.turns: false), so it never saw a turned image (use flips)")


def with_tta(run, x, mode: str, rows: int, segmenter: bool):
    """The mean of ``run``'s probabilities over ``mode``'s views of batch ``x`` (segmenters' masks
    turned back first): where the batch already is, on its device for a tensor."""
    views = TTA_VIEWS[mode]
    total = None
    for v in views:
        out = run(view(x, v, rows))
        out = unview(out, v) if segmenter else out
        total = out if total is None else total + out
    return total / len(views) if len(views) > 1 else total
