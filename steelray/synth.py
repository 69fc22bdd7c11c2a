"""Synthetic steel sheets that look like the real sets: the embedded default and most test data.

Severstal mode: 1600x256 grayscale sheets (stored as RGB with R=G=B, like the real JPEGs) with a
horizontal rolling texture, uneven illumination, sensor noise and sometimes a dark unlit band at one
end of the strip, carrying defects shaped like Severstal's four classes:
    1  small pits and dot clusters
    2  thin vertical scratches
    3  long scuffs and scratch fields (the most common class)
    4  large dark patches and holes
The true masks are written as Kaggle RLE into ``train.csv``. NEU mode: 200x200 images of the six
NEU classes in ``images/<class>_<n>.jpg`` with a ``labels.csv``.

Everything is deterministic by seed: image ``i`` of seed ``s`` depends on nothing else.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from steelray import rle, storage
from steelray.storage import S3Config
from steelray.data import NEU_CLASSES, SEVERSTAL_CLASSES
from steelray.config import SynthConfig
from steelray.images import SEVERSTAL_SIZE

# Severstal's training set: 47% of sheets defect-free; of the defect instances, class 3 ~73%,
# class 1 ~13%, class 4 ~11%, class 2 ~3.5%; ~6% of defective sheets carry two classes.
_DEFAULTS = SynthConfig()  # Severstal-like shares, said once (config.SynthConfig)
DEFECT_FREE_SHARE = _DEFAULTS.defect_free_share
CLASS_FREQ = tuple(_DEFAULTS.class_freq)
MULTI_SHARE = _DEFAULTS.multi_share
NEU_SIZE = 200


@dataclass
class Written:
    """What a generator wrote: where, and how many of each kind."""

    root: str
    labels_csv: str
    images: str
    count: int
    per_class: dict[str, int]
    defect_free: int = 0


# --- Severstal ----------------------------------------------------------------------------------

def severstal_sheet(seed: int, index: int, defect_free_share: float = DEFECT_FREE_SHARE,
                    class_freq: tuple[float, ...] = CLASS_FREQ, multi_share: float = MULTI_SHARE
                    ) -> tuple[np.ndarray, np.ndarray]:
    """One sheet: a (256, 1600) uint8 image and its (4, 256, 1600) boolean masks."""
    present = sheet_classes(seed, index, defect_free_share, class_freq, multi_share)
    rng = np.random.default_rng([seed, index, 1])
    h, w = SEVERSTAL_SIZE
    image, lit = _sheet_background(rng, h, w)
    masks = np.zeros((len(SEVERSTAL_CLASSES), h, w), dtype=bool)
    painters = (_pits, _vertical_scratches, _scuffs, _holes)
    for c in present:
        for _ in range(int(rng.integers(1, 3))):
            masks[c] |= painters[c](rng, image, lit)
    return np.clip(image, 0, 255).astype(np.uint8), masks


def sheet_classes(seed: int, index: int, defect_free_share: float = DEFECT_FREE_SHARE,
                  class_freq: tuple[float, ...] = CLASS_FREQ, multi_share: float = MULTI_SHARE) -> list[int]:
    """The class indices sheet ``index`` will carry (its own random stream, cheap to draw)."""
    rng = np.random.default_rng([seed, index, 0])
    if rng.random() < defect_free_share:
        return []
    p = np.asarray(class_freq, dtype=float) / np.sum(class_freq)
    present = [int(rng.choice(len(p), p=p))]
    if rng.random() < multi_share:
        rest = p.copy()
        rest[present[0]] = 0
        if rest.sum() > 0:
            present.append(int(rng.choice(len(p), p=rest / rest.sum())))
    return present


def _sheet_background(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Rolled steel: level, uneven light, rolling texture, streaks, noise, maybe an unlit end.
    Returns the float image and the lit column range [x0, x1)."""
    level = rng.uniform(60, 170)
    light = 1 + rng.uniform(0.08, 0.22) * _smooth_noise(rng, h, w, 400, 350)  # light varies along the strip
    light *= 1 + rng.uniform(0.03, 0.15) * _smooth_noise(rng, h, w, 110, 3000)  # and across it
    light *= 1 + rng.uniform(-0.2, 0.2) * np.linspace(-1, 1, w)[None, :]
    image = level * light
    image += rng.uniform(2, 6) * _smooth_noise(rng, h, w, 1, 30)      # horizontal rolling texture
    image += rng.uniform(1.5, 5) * _smooth_noise(rng, h, w, 90, 1.5)  # faint vertical streaks
    image += rng.uniform(4, 9) * _smooth_noise(rng, h, w, 4, 4)       # mottled grain
    image += rng.uniform(2, 6) * _smooth_noise(rng, h, w, 14, 5)
    canvas, draw = _canvas((h, w))
    for _ in range(int(rng.integers(0, 150))):                         # harmless scale smudges
        draw.polygon(_ellipse(rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2, 12), rng.uniform(1, 4),
                              rng.normal(0, 0.15)), fill=int(rng.integers(60, 256)))
    image -= rng.uniform(15, 35) * ndimage.gaussian_filter(np.asarray(canvas, np.float32) / 255, 1.2)
    for _ in range(int(rng.integers(0, 4))):                          # a few camera/roll lines
        x = int(rng.integers(0, w))
        image[:, x:x + int(rng.integers(1, 3))] += rng.uniform(-12, 8)
    image += rng.normal(0, rng.uniform(1.5, 4), (h, w))               # sensor noise
    lit = (0, w)
    if rng.random() < 0.15:                                           # the strip ends in the frame
        edge = int(rng.uniform(0.55, 0.85) * w)
        ramp = 1 / (1 + np.exp(-(np.arange(w) - edge) / 3.0))
        if rng.random() < 0.5:
            ramp, lit = ramp[::-1], (w - edge + 20, w)
        else:
            lit = (0, edge - 20)
        dark = rng.uniform(2, 12) + rng.normal(0, 1.5, (h, w))
        image = image * (1 - ramp[None, :]) + dark * ramp[None, :]
    return image, lit


def _pits(rng, image, lit) -> np.ndarray:
    """Class 1: a cluster of small dark (sometimes bright) pits."""
    h, w = image.shape
    cy, cx = rng.uniform(20, h - 20), rng.uniform(lit[0] + 30, lit[1] - 30)
    spread = rng.uniform(6, 25)
    canvas, draw = _canvas(image.shape)
    for _ in range(int(rng.integers(4, 25))):
        y, x = cy + rng.normal(0, spread), cx + rng.normal(0, spread * 1.5)
        ry, rx = rng.uniform(1.5, 5), rng.uniform(1.5, 5)
        draw.polygon(_ellipse(y, x, ry, rx, rng.uniform(0, math.pi)), fill=255)
    dots = np.asarray(canvas) > 0
    _paint(image, dots, rng.choice([-1, 1], p=[0.8, 0.2]) * rng.uniform(30, 70), soft=0.8)
    return ndimage.binary_dilation(dots, iterations=3)


def _vertical_scratches(rng, image, lit) -> np.ndarray:
    """Class 2: one to three thin, nearly vertical scratches."""
    h, w = image.shape
    canvas, draw = _canvas(image.shape)
    x = rng.uniform(lit[0] + 20, lit[1] - 20)
    for _ in range(int(rng.integers(1, 4))):
        x0 = x + rng.uniform(-25, 25)
        y0 = rng.uniform(0, h * 0.5)
        y1 = min(h, y0 + rng.uniform(60, h))
        draw.line([(x0, y0), (x0 + rng.uniform(-12, 12), y1)], fill=255, width=int(rng.integers(1, 4)))
    line = np.asarray(canvas) > 0
    _paint(image, line, rng.choice([-1, 1], p=[0.6, 0.4]) * rng.uniform(35, 70), soft=0.6)
    return ndimage.binary_dilation(line, iterations=2)


def _scuffs(rng, image, lit) -> np.ndarray:
    """Class 3: a field of short rubbed scratches, or one long lens-shaped scuff."""
    h, w = image.shape
    if rng.random() < 0.65:
        rh, rw = rng.uniform(40, h), rng.uniform(60, 450)
        cy = rng.uniform(rh / 2, h - rh / 2 + 1)
        cx = rng.uniform(lit[0] + rw / 2, max(lit[0] + rw / 2 + 1, lit[1] - rw / 2))
        region_img, region_draw = _canvas(image.shape)
        region_draw.polygon(_blob(rng, cy, cx, rh / 2, rw / 2, 0.25), fill=255)
        region = np.asarray(region_img) > 0
        strokes_img, draw = _canvas(image.shape)
        for _ in range(int(rw * rh / rng.uniform(120, 300))):
            y, x = rng.uniform(cy - rh / 2, cy + rh / 2), rng.uniform(cx - rw / 2, cx + rw / 2)
            draw.polygon(_ellipse(y, x, rng.uniform(4, 30), rng.uniform(0.8, 3), rng.normal(0, 0.12)),
                         fill=int(rng.integers(80, 256)))
        strokes = np.asarray(strokes_img, np.float32) / 255 * region
        _paint(image, region, -rng.uniform(4, 15), soft=6)                    # rubbed, duller area
        sign = rng.choice([-1, 1], p=[0.8, 0.2])
        image += sign * rng.uniform(25, 60) * ndimage.gaussian_filter(strokes, 1.0)
        return region
    length, thick = rng.uniform(150, 700), rng.uniform(8, 28)
    cy = rng.uniform(thick, h - thick)
    cx = rng.uniform(lit[0] + length / 2, max(lit[0] + length / 2 + 1, lit[1] - length / 2))
    canvas, draw = _canvas(image.shape)
    draw.polygon(_ellipse(cy, cx, thick / 2, length / 2, rng.normal(0, 0.03)), fill=255)
    lens = np.asarray(canvas) > 0
    _paint(image, lens, -rng.uniform(25, 55), soft=1.5)
    rim = ndimage.binary_dilation(lens, iterations=2) & ~lens
    _paint(image, rim, rng.uniform(15, 40), soft=0.7)
    return ndimage.binary_dilation(lens, iterations=2)


def _holes(rng, image, lit) -> np.ndarray:
    """Class 4: a large dark patch or hole with a ragged, sometimes bright rim."""
    h, w = image.shape
    ry, rx = rng.uniform(20, 110), rng.uniform(25, 120)
    cy, cx = rng.uniform(ry * 0.5, h - ry * 0.5), rng.uniform(lit[0] + rx, max(lit[0] + rx + 1, lit[1] - rx))
    canvas, draw = _canvas(image.shape)
    draw.polygon(_blob(rng, cy, cx, ry, rx, 0.35), fill=255)
    blob = np.asarray(canvas) > 0
    alpha = ndimage.gaussian_filter(blob.astype(np.float32), 1.2)
    inside = rng.uniform(8, 45) + 12 * _smooth_noise(rng, h, w, 6, 6)
    image[:] = image * (1 - alpha) + inside * alpha
    if rng.random() < 0.6:
        rim = ndimage.binary_dilation(blob, iterations=int(rng.integers(2, 5))) & ~blob
        _paint(image, rim, rng.uniform(40, 110), soft=1.0)
    return ndimage.binary_dilation(blob, iterations=2)


def make_severstal(out: str, n: int, seed: int = 0, *, defect_free_share: float = DEFECT_FREE_SHARE,
                   class_freq: tuple[float, ...] = CLASS_FREQ, multi_share: float = MULTI_SHARE,
                   s3: S3Config | None = None, workers: int | None = None, quality: int = 90) -> Written:
    """Write ``n`` sheets to ``out/train_images/`` and their masks to ``out/train.csv`` (Kaggle form)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if len(class_freq) != len(SEVERSTAL_CLASSES) or min(class_freq) < 0 or sum(class_freq) <= 0:
        raise ValueError(f"class_freq needs {len(SEVERSTAL_CLASSES)} non-negative weights, got {class_freq}")
    if not 0 <= defect_free_share <= 1:
        raise ValueError(f"defect_free_share must be in [0, 1], got {defect_free_share}")
    images = storage.join(out, "train_images")
    jobs = [("severstal", out, seed, i, (defect_free_share, tuple(class_freq), multi_share), s3, quality)
            for i in range(n)]
    rows = [row for rows in _run(jobs, workers) for row in rows]
    rows.sort()
    csv_uri = storage.join(out, "train.csv")
    storage.write_text(csv_uri, "ImageId,ClassId,EncodedPixels\n" + "".join(
        f"{image_id},{class_id},{pixels}\n" for image_id, class_id, pixels in rows), s3)
    per_class = {c: sum(r[1] == c for r in rows) for c in SEVERSTAL_CLASSES}
    defect_free = n - len({r[0] for r in rows})
    return Written(out, csv_uri, images, n, per_class, defect_free)


def severstal_image_id(seed: int, index: int) -> str:
    """A Kaggle-looking, deterministic image id such as ``3c247ad54.jpg``."""
    return hashlib.sha1(f"steelray-{seed}-{index}".encode()).hexdigest()[:9] + ".jpg"


# --- NEU ----------------------------------------------------------------------------------------

def neu_image(seed: int, index: int, cls: str) -> np.ndarray:
    """One 200x200 uint8 image of NEU class ``cls``."""
    if cls not in NEU_CLASSES:
        raise ValueError(f"unknown NEU class {cls!r}; choose one of {', '.join(NEU_CLASSES)}")
    rng = np.random.default_rng([seed, index, NEU_CLASSES.index(cls), 2])
    s = NEU_SIZE
    level = rng.uniform(70, 170)
    image = level * (1 + rng.uniform(0.05, 0.2) * _smooth_noise(rng, s, s, 100, 100))
    image += rng.uniform(3, 8) * _smooth_noise(rng, s, s, 60, 3)       # vertical rolling bands
    canvas, draw = _canvas((s, s))
    if cls == "crazing":                      # grainy surface crossed by a network of fine cracks
        image += rng.uniform(10, 20) * _smooth_noise(rng, s, s, 2, 2)
        for _ in range(int(rng.integers(15, 40))):
            y, x = rng.uniform(0, s, 2)
            points = [(x, y)]
            for _ in range(int(rng.integers(3, 8))):
                x, y = x + rng.uniform(3, 12), y + rng.normal(0, 4)
                points.append((x, y))
            draw.line(points, fill=255, width=1)
        _paint(image, np.asarray(canvas) > 0, -rng.uniform(35, 60), soft=0.6)
    elif cls == "inclusion":                  # dark elongated spots strung along the rolling direction
        x = rng.uniform(30, s - 30)
        for _ in range(int(rng.integers(3, 12))):
            draw.polygon(_ellipse(rng.uniform(0, s), x + rng.normal(0, 25), rng.uniform(5, 18),
                                  rng.uniform(1.5, 5), rng.normal(0, 0.1)), fill=255)
        _paint(image, np.asarray(canvas) > 0, -rng.uniform(25, 60), soft=1.2)
    elif cls == "patches":                    # large dark blotches on a bright, noisy surface
        image += 40 + rng.uniform(8, 16) * _smooth_noise(rng, s, s, 2, 2)
        for _ in range(int(rng.integers(1, 4))):
            draw.polygon(_blob(rng, rng.uniform(0, s), rng.uniform(0, s), rng.uniform(20, 50),
                               rng.uniform(12, 35), 0.4), fill=255)
        _paint(image, np.asarray(canvas) > 0, -rng.uniform(50, 90), soft=4)
    elif cls == "pitted_surface":             # many small pits over a bright, shaded surface
        image += 50 + 25 * np.linspace(-1, 1, s)[:, None] * rng.choice([-1, 1])
        cx, spread = rng.uniform(0, s), rng.uniform(30, 120)
        for _ in range(int(rng.integers(40, 160))):
            draw.polygon(_ellipse(rng.uniform(0, s), cx + rng.normal(0, spread), rng.uniform(1, 3.5),
                                  rng.uniform(1, 2.5), 0), fill=255)
        _paint(image, np.asarray(canvas) > 0, -rng.uniform(20, 45), soft=0.8)
    elif cls == "rolled-in_scale":            # scattered dark flakes pressed into a textured surface
        image += rng.uniform(5, 10) * _smooth_noise(rng, s, s, 3, 3)
        for _ in range(int(rng.integers(10, 35))):
            draw.polygon(_blob(rng, rng.uniform(0, s), rng.uniform(0, s), rng.uniform(2, 5),
                               rng.uniform(3, 10), 0.5, vertices=7), fill=255)
        _paint(image, np.asarray(canvas) > 0, -rng.uniform(25, 50), soft=1.0)
    else:                                     # scratches: long thin bright lines
        image -= rng.uniform(10, 40)
        horizontal = rng.random() < 0.5
        for _ in range(int(rng.integers(1, 4))):
            a, b = rng.uniform(0, s, 2)
            ends = [(0, a), (s, a + rng.normal(0, 15))] if horizontal else [(a, 0), (a + rng.normal(0, 15), s)]
            draw.line(ends, fill=255, width=int(rng.integers(1, 5)))
        _paint(image, np.asarray(canvas) > 0, rng.uniform(60, 110), soft=1.0)
    image += rng.normal(0, rng.uniform(2, 5), (s, s))
    return np.clip(image, 0, 255).astype(np.uint8)


def make_neu(out: str, per_class: int, seed: int = 0, *, s3: S3Config | None = None,
             workers: int | None = None, quality: int = 90) -> Written:
    """Write ``per_class`` images of each NEU class to ``out/images/`` plus ``out/labels.csv``."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    jobs = [("neu", out, seed, i, cls, s3, quality) for cls in NEU_CLASSES for i in range(1, per_class + 1)]
    rows = sorted(row for rows in _run(jobs, workers) for row in rows)
    csv_uri = storage.join(out, "labels.csv")
    storage.write_text(csv_uri, "filename,label\n" + "".join(f"{f},{c}\n" for f, c in rows), s3)
    return Written(out, csv_uri, storage.join(out, "images"), len(rows),
                   {c: per_class for c in NEU_CLASSES})


# --- helpers ------------------------------------------------------------------------------------

def montage(images: list[np.ndarray], columns: int = 1, gap: int = 6) -> np.ndarray:
    """Tile equally sized grayscale images into one array (white gaps), to look at what we made."""
    h, w = images[0].shape[:2]
    rows = math.ceil(len(images) / columns)
    out = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = im
    return out


def overlay(image: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """RGB view of a sheet with each class's mask outlined in its own colour (1 red, 2 green,
    3 blue, 4 yellow): for checking masks by eye."""
    rgb = np.repeat(image[:, :, None], 3, axis=2)
    colours = [(255, 0, 0), (0, 255, 0), (40, 120, 255), (255, 220, 0)]
    for mask, colour in zip(masks, colours):
        edge = mask & ~ndimage.binary_erosion(mask, iterations=2)
        rgb[edge] = colour
    return rgb


def jpeg_bytes(image: np.ndarray, quality: int = 90) -> bytes:
    """Grayscale array to JPEG bytes stored as RGB with R=G=B, as both real data sets are."""
    buf = io.BytesIO()
    Image.fromarray(image).convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def damaged(blob: bytes, rng: np.random.Generator, where: str = "anywhere") -> bytes:
    """``blob`` with one random injury: noise over, a cut of, or an insertion of random bytes.
    ``anywhere``: 1-2,000 bytes past the first eighth (mostly image data); ``header``: 1-3 bytes
    in the first 800 (a JPEG's tables). For testing how corrupt files are caught."""
    b = bytearray(blob)
    if where == "header":
        n, at = int(rng.integers(1, 4)), int(rng.integers(2, min(800, len(b) - 4)))
    else:
        n = min(int(rng.choice([1, 5, 20, 200, 2000])), len(b) // 4)
        at = int(rng.integers(len(b) // 8, len(b) - n - 2))
    kind = rng.integers(3)
    if kind == 0:
        b[at:at + n] = rng.bytes(n)
    elif kind == 1:
        del b[at:at + n]
    else:
        b[at:at] = rng.bytes(n)
    return bytes(b)


def _write_one(job) -> list[tuple]:
    kind, out, seed, index, params, s3, quality = job
    if kind == "severstal":
        image, masks = severstal_sheet(seed, index, *params)
        image_id = severstal_image_id(seed, index)
        storage.write_bytes(storage.join(out, "train_images", image_id), jpeg_bytes(image, quality), s3)
        return [(image_id, SEVERSTAL_CLASSES[c], rle.encode(m)) for c, m in enumerate(masks) if m.any()]
    cls = params
    name = f"{cls}_{index}.jpg"
    storage.write_bytes(storage.join(out, "images", name), jpeg_bytes(neu_image(seed, index, cls), quality), s3)
    return [(name, cls)]


def _run(jobs: list, workers: int | None) -> list:
    workers = workers or min(os.cpu_count() or 1, 8)
    if workers == 1 or len(jobs) < 16:
        return [_write_one(j) for j in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_write_one, jobs, chunksize=8))


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell_h: float, cell_w: float) -> np.ndarray:
    """Zero-mean, unit-ish noise correlated over about ``cell_h`` x ``cell_w`` pixels (bicubic
    upsampling of a coarse grid: much cheaper than a wide Gaussian filter)."""
    gh, gw = max(2, round(h / cell_h) + 1), max(2, round(w / cell_w) + 1)
    coarse = Image.fromarray(rng.standard_normal((gh, gw)).astype(np.float32), mode="F")
    return np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.float32)


def _canvas(shape: tuple[int, int]) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    return canvas, ImageDraw.Draw(canvas)


def _paint(image: np.ndarray, where: np.ndarray, delta: float, soft: float) -> None:
    """Add ``delta`` over ``where`` with edges softened by a Gaussian of sigma ``soft``."""
    if not where.any():
        return
    image += delta * ndimage.gaussian_filter(where.astype(np.float32), soft)


def _ellipse(cy: float, cx: float, ry: float, rx: float, angle: float, n: int = 24) -> list[tuple]:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = math.cos(angle), math.sin(angle)
    return list(zip(cx + c * x - s * y, cy + s * x + c * y))


def _blob(rng, cy: float, cx: float, ry: float, rx: float, rough: float, vertices: int = 18) -> list[tuple]:
    """An irregular closed outline: an ellipse whose radius wobbles smoothly by ``rough``."""
    t = np.linspace(0, 2 * math.pi, vertices, endpoint=False)
    wobble = 1 + rough * np.convolve(np.tile(rng.normal(0, 1, vertices), 3), np.ones(3) / 3, "same")[vertices:2 * vertices]
    wobble = np.clip(wobble, 0.3, None)
    return list(zip(cx + rx * wobble * np.cos(t), cy + ry * wobble * np.sin(t)))
