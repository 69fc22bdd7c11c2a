"""Kaggle run-length encoding of binary masks, as used by Severstal's train.csv and submissions.

A mask of shape (H, W) is numbered 1..H*W top to bottom, then left to right (column-major), and
written as space-separated ``start length`` pairs, sorted and non-overlapping. The empty string is
the empty mask. Everything here is vectorised with numpy: no Python loop over pixels or runs.
"""

from __future__ import annotations

import numpy as np

SEVERSTAL_SHAPE = (256, 1600)


def parse(rle: str, shape: tuple[int, int] = SEVERSTAL_SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``rle`` for a mask of ``shape`` and return its (starts, lengths), 1-indexed.

    Raises ValueError saying what is wrong: odd token count, non-integer token, zero or negative
    length, run out of bounds, unsorted or overlapping runs.
    """
    if not isinstance(rle, str):
        raise ValueError(f"RLE must be a string, got {type(rle).__name__}")
    tokens = rle.split()
    if len(tokens) % 2:
        raise ValueError(f"odd number of tokens ({len(tokens)}): RLE is 'start length' pairs")
    try:
        runs = np.array(tokens, dtype=np.int64).reshape(-1, 2)
    except (ValueError, OverflowError):
        bad = next(t for t in tokens if not _is_int(t))
        raise ValueError(f"non-integer token {bad!r}") from None
    starts, lengths = runs[:, 0], runs[:, 1]
    if len(runs) == 0:
        return starts, lengths
    size = shape[0] * shape[1]
    _first_bad(lengths <= 0, "zero or negative length", starts, lengths)
    _first_bad(starts < 1, "start before pixel 1", starts, lengths)
    _first_bad(starts + lengths - 1 > size, f"run past the last pixel ({size} for {shape[0]}x{shape[1]})",
               starts, lengths)
    _first_bad(np.r_[False, starts[1:] <= starts[:-1]], "runs not sorted by start", starts, lengths)
    _first_bad(np.r_[False, starts[1:] < (starts + lengths)[:-1]], "runs overlap the previous run",
               starts, lengths)
    return starts, lengths


def decode(rle: str, shape: tuple[int, int] = SEVERSTAL_SHAPE) -> np.ndarray:
    """Decode a Kaggle RLE string into a boolean mask of ``shape`` (rows, columns)."""
    starts, lengths = parse(rle, shape)
    flat = np.zeros(shape[0] * shape[1], dtype=bool)
    if len(starts):
        # Index every masked pixel at once: cost grows with the mask's area, not the sheet's size.
        offsets = np.cumsum(lengths) - lengths  # where each run begins among the masked pixels
        flat[np.arange(offsets[-1] + lengths[-1]) + np.repeat(starts - 1 - offsets, lengths)] = True
    return flat.reshape(shape, order="F")


def encode(mask: np.ndarray) -> str:
    """Encode a 2-D boolean (or 0/1) mask as a Kaggle RLE string; touching runs are merged."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (rows, columns), got shape {mask.shape}")
    if mask.dtype != bool:
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("mask must be boolean or hold only 0 and 1")
        mask = mask.astype(bool)
    pixels = np.concatenate([[False], mask.ravel(order="F"), [False]])
    changes = np.flatnonzero(pixels[1:] != pixels[:-1]) + 1  # 1-indexed run starts and ends
    changes[1::2] -= changes[::2]
    return " ".join(changes.astype(str))


def area(rle: str, shape: tuple[int, int] = SEVERSTAL_SHAPE) -> int:
    """Number of mask pixels in ``rle`` (validated), without building the mask."""
    return int(parse(rle, shape)[1].sum())


def _is_int(token: str) -> bool:
    try:
        int(token)
    except ValueError:
        return False
    return True


def _first_bad(bad: np.ndarray, what: str, starts: np.ndarray, lengths: np.ndarray) -> None:
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{what} at pair {i + 1} ('{starts[i]} {lengths[i]}')")
