"""Labelled image sets into one manifest: Severstal CSVs, NEU folders and plain CSVs, local or on S3.

A manifest is a table with one row per image:
    image_id  the file name (Severstal's ImageId)
    uri       local path or s3:// URI of the image
    labels    sorted class indices present in the image ([] = defect-free)
    rles      one Kaggle RLE string per class ("" = no mask), or None when the format has no masks
    group     split key: rows sharing it always land on the same side of a split
Bad input raises DataError naming the file or row and the problem (or, with
``on_bad_input: drop``, drops the image with a counted warning). Nothing is dropped silently.
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import hashlib
import io
import logging
import os
import posixpath
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from steelray import rle, storage
from steelray.config import Config, DataConfig, S3Config

log = logging.getLogger(__name__)

SEVERSTAL_CLASSES = ["1", "2", "3", "4"]
SEVERSTAL_SIZE = (256, 1600)  # (height, width) of every sheet and of its masks
NEU_CLASSES = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]
NEU_ABBREVIATIONS = {"cr": "crazing", "in": "inclusion", "pa": "patches", "ps": "pitted_surface",
                     "rs": "rolled-in_scale", "sc": "scratches"}  # NEU-CLS file names: Cr_1.bmp ...
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
_MAX_LISTED = 20  # problems spelled out in one error before "... and N more"


class DataError(ValueError):
    """Bad input data; the message names the file or row and what is wrong."""


@dataclass
class Manifest:
    records: pd.DataFrame
    classes: list[str]
    source: str
    has_masks: bool = False
    dropped: list[str] = field(default_factory=list)  # one line per image dropped, and why

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, index: np.ndarray | list[int]) -> Manifest:
        return replace(self, records=self.records.iloc[index].reset_index(drop=True))

    def targets(self, task: str) -> np.ndarray:
        """Training targets: binary (N,), multilabel (N, C) multi-hot, multiclass (N,) class index."""
        labels = self.records["labels"]
        if task == "binary":
            return np.array([len(x) > 0 for x in labels], dtype=np.float32)
        if task in ("multilabel", "segmentation"):
            out = np.zeros((len(labels), len(self.classes)), dtype=np.float32)
            for i, x in enumerate(labels):
                out[i, list(x)] = 1.0
            return out
        if task == "multiclass":
            bad = [(iid, len(x)) for iid, x in zip(self.records["image_id"], labels) if len(x) != 1]
            if bad:
                raise DataError(f"{self.source}: multiclass needs exactly one label per image; "
                                + _listing([f"{iid} has {n}" for iid, n in bad]))
            return np.array([x[0] for x in labels], dtype=np.int64)
        raise ValueError(f"unknown task {task!r}; choose binary, multilabel, multiclass, segmentation")

    def class_counts(self) -> dict[str, int]:
        counts = Counter(i for x in self.records["labels"] for i in x)
        return {c: counts.get(i, 0) for i, c in enumerate(self.classes)}

    def summary(self) -> str:
        free = sum(len(x) == 0 for x in self.records["labels"])
        per_class = ", ".join(f"{c}: {n}" for c, n in self.class_counts().items())
        return (f"{len(self)} images from {self.source} ({free} without defect; per class {per_class})"
                + (f"; {len(self.dropped)} dropped" if self.dropped else ""))


# --- building a manifest ----------------------------------------------------------------------

def build_manifest(cfg: Config | DataConfig, s3: S3Config | None = None) -> Manifest:
    """Read the data set that ``cfg.data`` describes into a validated manifest."""
    if isinstance(cfg, Config):
        data, s3 = cfg.data, cfg.s3
    else:
        data = cfg
    if not data.root:
        raise DataError("data.root: empty; set it to the data set's folder or s3:// prefix")
    readers = {"severstal": read_severstal, "neu": read_neu, "csv": read_csv}
    if data.format not in readers:
        raise DataError(f"data.format: unknown {data.format!r}; choose one of {', '.join(readers)}")
    manifest = readers[data.format](data, s3)
    if data.limit:
        manifest = manifest.subset(np.arange(min(data.limit, len(manifest))))
    return manifest


def read_severstal(data: DataConfig, s3: S3Config | None = None) -> Manifest:
    """Kaggle Severstal: ``train.csv`` (ImageId,ClassId,EncodedPixels or the older
    ImageId_ClassId,EncodedPixels) plus the image folder; images without a row are defect-free."""
    classes = data.classes or SEVERSTAL_CLASSES
    csv_uri = storage.join(data.root, data.labels_csv or "train.csv")
    images_uri = storage.join(data.root, data.images_dir or "train_images")
    rows = _read_csv_rows(csv_uri, s3)
    header = [h.strip() for h in rows[0][1]] if rows else []
    new_form, old_form = ["ImageId", "ClassId", "EncodedPixels"], ["ImageId_ClassId", "EncodedPixels"]
    if header not in (new_form, old_form):
        missing = [c for c in new_form if c not in header]
        raise DataError(f"{csv_uri}: header {','.join(header) or '(empty file)'}: expected "
                        f"ImageId,ClassId,EncodedPixels (or the older ImageId_ClassId,EncodedPixels); "
                        f"missing column(s): {', '.join(missing)}")

    problems = _Problems(data.on_bad_input, csv_uri)
    masks: dict[str, dict[int, str]] = defaultdict(dict)
    first_row: dict[tuple[str, int], int] = {}
    row_of_image: dict[str, int] = {}
    for line, fields in _well_formed(rows, len(header), problems):
        if header == new_form:
            image_id, class_id, pixels = (f.strip() for f in fields)
        else:
            key, pixels = fields[0].strip(), fields[1].strip()
            image_id, _, class_id = key.rpartition("_")
            if not image_id:
                problems.add(None, f"row {line}: ImageId_ClassId {key!r} is not <image>_<class>")
                continue
        row_of_image.setdefault(image_id, line)
        if class_id not in classes:
            problems.add(image_id, f"row {line} ({image_id}): unknown ClassId {class_id!r}; "
                                   f"valid: {', '.join(classes)}")
            continue
        index = classes.index(class_id)
        if (image_id, index) in first_row:
            problems.add(image_id, f"row {line} ({image_id}): second row for class {class_id} "
                                   f"(first at row {first_row[image_id, index]})")
            continue
        first_row[image_id, index] = line
        try:
            rle.parse(pixels, SEVERSTAL_SIZE)
        except ValueError as e:
            problems.add(image_id, f"row {line} ({image_id}, class {class_id}): malformed EncodedPixels: {e}")
            continue
        masks[image_id]  # an image listed with only empty rows (old form) is known and defect-free
        if pixels:
            masks[image_id][index] = pixels

    files = {posixpath.basename(u): u for u in storage.list_files(images_uri, s3, IMAGE_SUFFIXES)}
    for image_id in sorted(set(row_of_image) - set(files)):
        problems.add(image_id, f"row {row_of_image[image_id]}: image {image_id} is listed in "
                               f"{posixpath.basename(csv_uri)} but missing from {images_uri}")
    ids = sorted(files)
    records = pd.DataFrame({
        "image_id": ids,
        "uri": [files[i] for i in ids],
        "labels": [sorted(masks.get(i, {})) for i in ids],
        "rles": [[masks.get(i, {}).get(c, "") for c in range(len(classes))] for i in ids],
    })
    records = _finish(records, data, s3, problems, expected_size=SEVERSTAL_SIZE)
    return Manifest(records, list(classes), csv_uri, has_masks=True, dropped=problems.dropped)


def read_neu(data: DataConfig, s3: S3Config | None = None) -> Manifest:
    """NEU surface defects: ``<class>_<n>.jpg/.bmp`` files, or one subfolder per class. The label
    comes from the name; byte-identical duplicates are dropped (with a warning) before any split."""
    classes = data.classes or NEU_CLASSES
    folder = storage.join(data.root, data.images_dir) if data.images_dir else data.root
    if not data.images_dir and storage.isdir(storage.join(data.root, "images"), s3):
        folder = storage.join(data.root, "images")  # the NEU-DET layout: images/ + annotations
    uris = storage.list_files(folder, s3, IMAGE_SUFFIXES)
    if not uris:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    problems = _Problems(data.on_bad_input, folder)
    ids, labels = [], []
    base = folder.rstrip("/") + "/"
    for uri in uris:
        rel = uri[len(base):] if uri.startswith(base) else posixpath.basename(uri)
        parts = rel.replace(os.sep, "/").split("/")
        name = parts[-1]
        raw = parts[-2] if len(parts) > 1 else os.path.splitext(name)[0].rpartition("_")[0]
        label = NEU_ABBREVIATIONS.get(raw.lower(), raw.lower())
        ids.append(rel)
        if label not in classes:
            problems.add(rel, f"{uri}: cannot tell the class from the name ({raw!r}); expected "
                              f"<class>_<n>.jpg or <class>/<file> with class one of {', '.join(classes)}")
            labels.append([])
        else:
            labels.append([classes.index(label)])
    records = pd.DataFrame({"image_id": ids, "uri": uris, "labels": labels, "rles": [None] * len(ids)})
    records = _finish(records, data, s3, problems, dedupe=True)
    return Manifest(records, list(classes), folder, has_masks=False, dropped=problems.dropped)


def read_csv(data: DataConfig, s3: S3Config | None = None) -> Manifest:
    """A plain CSV: an image column (path relative to ``images_dir``/root, or a URI) and either one
    label column of class names or one 0/1 column per class. An empty label means defect-free."""
    csv_uri = storage.join(data.root, data.labels_csv)
    images_uri = storage.join(data.root, data.images_dir) if data.images_dir else data.root
    rows = _read_csv_rows(csv_uri, s3)
    header = [h.strip() for h in rows[0][1]] if rows else []
    wanted = [data.image_column, *data.label_columns] + ([data.group_column] if data.group_column else [])
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DataError(f"{csv_uri}: missing column(s) {', '.join(missing)}; the file has: "
                        f"{', '.join(header) or '(no header)'}")
    col = {name: header.index(name) for name in wanted}
    one_column = len(data.label_columns) == 1
    classes = list(data.classes) or (None if one_column else list(data.label_columns))
    if not one_column and len(classes) != len(data.label_columns):
        raise DataError(f"data.classes: {len(classes)} names for {len(data.label_columns)} label columns")

    problems = _Problems(data.on_bad_input, csv_uri)
    parsed, seen = [], {}
    for line, fields in _well_formed(rows, len(header), problems):
        image = fields[col[data.image_column]].strip()
        if not image:
            problems.add(None, f"row {line}: empty {data.image_column}")
            continue
        if image in seen:
            problems.add(image, f"row {line}: image {image} already listed at row {seen[image]}")
            continue
        seen[image] = line
        if one_column:
            cell = fields[col[data.label_columns[0]]].strip()
            names = [v.strip() for v in (cell.split(data.label_separator) if data.label_separator else [cell])]
            value = [n for n in names if n]
        else:
            value = []
            for i, name in enumerate(data.label_columns):
                cell = fields[col[name]].strip()
                if cell not in ("", "0", "1", "0.0", "1.0"):
                    problems.add(image, f"row {line} ({image}): column {name} must be 0 or 1, got {cell!r}")
                    value = None
                    break
                if cell in ("1", "1.0"):
                    value.append(i)
            if value is None:
                continue
        group = fields[col[data.group_column]].strip() if data.group_column else ""
        parsed.append((line, image, value, group))

    if classes is None:
        classes = sorted({n for _, _, names, _ in parsed for n in names})
    rows_out = []
    for line, image, value, group in parsed:
        if one_column:
            unknown = [n for n in value if n not in classes]
            if unknown:
                problems.add(image, f"row {line} ({image}): unknown label {unknown[0]!r}; "
                                    f"valid: {', '.join(classes)}")
                continue
            value = sorted({classes.index(n) for n in value})
        uri = storage.join(images_uri, image)
        rows_out.append({"image_id": image, "uri": uri, "labels": value, "rles": None,
                         "group": group or None, "row": line})
    records = pd.DataFrame(rows_out, columns=["image_id", "uri", "labels", "rles", "group", "row"])
    records = _finish(records, data, s3, problems, check_exist=True)
    return Manifest(records, list(classes), csv_uri, has_masks=False, dropped=problems.dropped)


# --- images -----------------------------------------------------------------------------------

# PIL modes of more than 8 bits per pixel (16-bit PNG/TIFF from line-scan cameras, 32-bit, float):
# PIL's conversion to 8-bit clips them (a 12-bit sheet comes out almost all white), so they are refused.
_DEEP_MODES = {"I;16": "16-bit", "I;16L": "16-bit", "I;16B": "16-bit", "I;16N": "16-bit", "I": "32-bit integer",
               "F": "32-bit float"}


@contextlib.contextmanager
def _opened(data: bytes, name: str):
    """The PIL image of ``data``; what PIL cannot read, a JPEG whose structure is broken, and an image
    of more than 8 bits per pixel become a DataError naming ``name``."""
    if not data:
        raise DataError(f"{name}: empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format == "JPEG" and (problem := jpeg_structure_error(data)):
                raise OSError(f"corrupt JPEG data: {problem}")
            if im.mode in _DEEP_MODES:
                raise DataError(f"{name}: {_DEEP_MODES[im.mode]} greyscale {im.format} (mode {im.mode}): the "
                                "models take 8-bit images and converting here would clip it; scale it to "
                                "8 bits (0-255) first")
            yield im
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError(f"{name}: not an image (unrecognised format, {len(data)} bytes)") from None
    except Image.DecompressionBombError as e:  # a corrupt header can claim billions of pixels
        raise DataError(f"{name}: unreadable image ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{name}: unreadable or truncated image ({e})") from None


def decode_image(data: bytes, in_chans: int = 1, name: str = "image") -> np.ndarray:
    """Decode image bytes to a (H, W, in_chans) uint8 array.

    Grayscale stored as RGB (both real sets are R=G=B) becomes one channel for ``in_chans=1``;
    a one-channel image is repeated for ``in_chans=3``. Raises DataError naming ``name``.
    """
    with _opened(data, name) as im:
        if in_chans == 1 and im.format == "JPEG":
            im.draft("L", im.size)  # let libjpeg emit luma directly: no RGB round trip
        array = np.asarray(im.convert("L" if in_chans == 1 else "RGB"))
    return array[:, :, None] if array.ndim == 2 else array


def probe_image(data: bytes, name: str = "image") -> tuple[str, int, int]:
    """(format, height, width) from the header alone, without decoding the pixels; raises DataError
    naming ``name`` as ``decode_image`` would for empty and non-image bytes."""
    with _opened(data, name) as im:
        return im.format or "", im.height, im.width


# --- JPEG structure -----------------------------------------------------------------------------
# libjpeg (PIL's and torchvision's CPU decoder) rejects a JPEG only when its marker structure is
# broken: a bad table or header, a marker where none can be. Damage that keeps the structure decodes,
# with warnings, to a damaged picture. GPU decoders (nvJPEG) are laxer still, so a file that libjpeg
# rejects can come out of the GPU as an image. ``jpeg_structure_error`` walks the markers without
# decoding (~0.1 ms for a Severstal sheet, 1/20 of a decode) and names what is broken: of 100,000
# randomly damaged real sheets it refused every one libjpeg refused, and 16.6% more that libjpeg
# decodes with a warning (benchmarks/jpeg_check.py, docs/benchmarks.md). PIL reads headers but
# checks none of this, and no library we found checks it without decoding, hence our own.

_SEQUENTIAL = {0xC0, 0xC1, 0xC3, 0xC5, 0xC7, 0xC9, 0xCB, 0xCD, 0xCF}  # each component in one scan
_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}
_LOSSLESS = {0xC3, 0xC7, 0xCB, 0xCF}  # (also sequential)
_HUFFMAN = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7}  # the others are arithmetic-coded
_SKIPPED = {0xCC, 0xDC, 0xDF, 0xFE, *range(0xE0, 0xF0)}  # DAC, DNL, EXP, COM, APPn: passed over by length
_SEGMENTS = _SEQUENTIAL | _PROGRESSIVE | _LOSSLESS | _SKIPPED | {0xC4, 0xDA, 0xDB, 0xDD}


def _codes_overflow(counts: bytes) -> bool:
    """Whether canonical Huffman codes with ``counts[l - 1]`` codes of length l run out of bit
    patterns (libjpeg also refuses the all-ones code)."""
    code = 0
    for length, count in enumerate(counts.rstrip(b"\x00"), start=1):
        code += count
        if code >= 1 << length:
            return True
        code <<= 1
    return False


def _segment_error(m: int, seg: bytes, state: dict) -> str | None:
    """What is wrong with the body ``seg`` of the segment whose marker is ``m`` (None: nothing).
    ``state`` carries the frame's components and the tables defined so far."""
    n = len(seg)
    if m in _SEQUENTIAL or m in _PROGRESSIVE:
        nf = seg[5] if n > 5 else 0
        if state["frame"] is not None:
            return "a second frame header"
        if nf == 0 or n != 6 + 3 * nf or seg[0] not in (8, 12, 16) or not (seg[3] or seg[4]):
            return "a bad frame header"
        comps = [seg[6 + 3 * i:9 + 3 * i] for i in range(nf)]  # id, sampling factors, table
        if any(not 1 <= f >> 4 <= 4 or not 1 <= f & 15 <= 4 or q > 3 for _, f, q in comps):
            return "a bad frame header"
        state["frame"], state["components"] = m, {c: q for c, _, q in comps}
        state["blocks"] = {c: (f >> 4) * (f & 15) for c, f, _ in comps}
    elif m == 0xDA:
        ns = seg[0] if n else 0
        if state["frame"] is None or not 1 <= ns <= 4 or n != 4 + 2 * ns:
            return "a bad scan header"
        ids, tables = seg[1:1 + 2 * ns:2], seg[2:2 + 2 * ns:2]
        ss, se, ah, al = seg[-3], seg[-2], seg[-1] >> 4, seg[-1] & 15
        if (not set(ids) <= state["components"].keys() or len(set(ids)) != ns
                or any(t >> 4 > 3 or t & 15 > 3 for t in tables)
                or (ns > 1 and sum(state["blocks"][c] for c in ids) > 10)):  # libjpeg's MCU limit
            return "a bad scan header"
        if state["frame"] in _PROGRESSIVE:
            if se > 63 or ss > se or (ss == 0) != (se == 0) or (ss and ns != 1) or (ah and al != ah - 1) or al > 13:
                return "bad progressive scan parameters"
            needed = [(1, t & 15) if ss else (0, t >> 4) for t in tables] if ss or not ah else []
        else:
            if state["scanned"] & set(ids):
                return "a second scan of the same component"
            needed = [(0, t >> 4) for t in tables] + [(1, t & 15) for t in tables]
        supplied = 2 if state["frame"] in _SEQUENTIAL else 0  # libjpeg's defaults for 0 and 1 (Motion JPEG)
        if state["frame"] in _HUFFMAN and any(k[1] >= supplied and k not in state["huffman"] for k in needed):
            return "a scan using a Huffman table never defined"
        if state["frame"] not in _LOSSLESS and any(state["components"][c] not in state["quant"] for c in ids):
            return "a scan using a quantisation table never defined"
        state["scanned"] |= set(ids)
    elif m == 0xC4:  # Huffman tables: class and id, 16 code counts, that many symbols
        i = 0
        while i < n:
            kind, counts = seg[i], seg[i + 1:i + 17]
            size = 17 + sum(counts)
            if i + 17 > n or kind >> 4 > 1 or kind & 15 > 3 or i + size > n or _codes_overflow(counts):
                return "a bad Huffman table"
            if kind >> 4 == 0 and state["frame"] not in _LOSSLESS and max(seg[i + 17:i + size], default=0) > 15:
                return "a bad Huffman table"  # as libjpeg's jpeg_make_d_derived_tbl: DC symbols <= 15
            state["huffman"].add((kind >> 4, kind & 15))
            i += size
    elif m == 0xDB:  # quantisation tables: precision and id, 64 values of 1 or 2 bytes
        i = 0
        while i < n:
            size = {0: 65, 1: 129}.get(seg[i] >> 4, 0)
            if not size or seg[i] & 15 > 3 or i + size > n:
                return "a bad quantisation table"
            state["quant"].add(seg[i] & 15)
            i += size
    elif m == 0xDD:
        if n != 2:
            return "a bad restart interval"
        state["restart"] = seg[0] << 8 | seg[1]
    return None


def jpeg_structure_error(data: bytes) -> str | None:
    """What breaks the marker structure of a JPEG, with its byte offset; None when the structure is
    sound, when ``data`` is no JPEG, and when it ends early (the decoder calls that truncated)."""
    data = bytes(data)
    if data[:2] != b"\xff\xd8":
        return None
    a = np.frombuffer(data, np.uint8)
    n, ends = len(data), data[-2:] == b"\xff\xd9"
    ff = np.flatnonzero(a[:-1] == 0xFF)
    after = a[ff + 1]
    is_rst = (after >= 0xD0) & (after <= 0xD7)
    markers = ff[(after != 0) & (after != 0xFF) & ~is_rst].tolist()  # not stuffed zeros, fill, restarts
    restarts, restart_codes = ff[is_rst], after[is_rst]
    state = {"frame": None, "components": {}, "scanned": set(), "restart": 0, "huffman": set(), "quant": set()}
    pos = 2
    while True:
        while data[pos:pos + 2] == b"\xff\xff":
            pos += 1
        if data[pos:pos + 2] == b"\xff\xd9":
            return None if state["scanned"] else f"the end-of-image marker at byte {pos}, before any image data"
        if pos + 4 > n:
            return None
        if data[pos] != 0xFF:
            return f"marker expected at byte {pos}, found 0x{data[pos]:02X}"
        m, length = data[pos + 1], data[pos + 2] << 8 | data[pos + 3]
        if m not in _SEGMENTS:
            return f"marker 0xFF{m:02X} where none can be, at byte {pos}"
        if length < 2 or pos + 2 + length > n:
            return f"the segment at byte {pos} (0xFF{m:02X}) runs past the end" if ends else None
        if problem := _segment_error(m, data[pos + 4:pos + 2 + length], state):
            return f"{problem} at byte {pos}"
        pos += 2 + length
        if m == 0xDA:  # entropy-coded data, up to the next marker that is not a restart
            k = bisect.bisect_left(markers, pos)
            end = markers[k] if k < len(markers) else n
            lo, hi = np.searchsorted(restarts, [pos, end])
            codes = restart_codes[lo:hi]
            if len(codes) and (not state["restart"] or (codes != 0xD0 + np.arange(len(codes)) % 8).any()):
                return f"restart marker out of place in the scan data after byte {pos}"
            if k == len(markers):
                return None
            pos = end

def load_image(uri: str, in_chans: int = 1, s3: S3Config | None = None) -> np.ndarray:
    """Read and decode one image from a local path or s3:// URI."""
    try:
        data = storage.read_bytes(uri, s3)
    except FileNotFoundError:
        raise DataError(f"{uri}: image missing") from None
    return decode_image(data, in_chans, uri)


# --- splits -----------------------------------------------------------------------------------

def split(manifest: Manifest, data: DataConfig) -> tuple[Manifest, Manifest]:
    """Deterministic (by ``data.seed``) train/validation split, stratified by label set and grouped
    by ``group`` so that no group (an image, a duplicate set, a coil) sits on both sides.
    With ``data.folds >= 2`` it is fold ``data.fold`` of a stratified group k-fold."""
    from sklearn.model_selection import StratifiedGroupKFold, train_test_split

    n = len(manifest)
    if n < 2:
        raise DataError(f"{manifest.source}: {n} image(s); a split needs at least 2")
    strata = np.array(["+".join(map(str, x)) or "none" for x in manifest.records["labels"]])
    groups = manifest.records["group"].to_numpy()
    if data.folds >= 2:
        codes = pd.factorize(strata)[0]
        folds = StratifiedGroupKFold(n_splits=data.folds, shuffle=True, random_state=data.seed)
        train_idx, val_idx = list(folds.split(np.zeros(n), codes, groups))[data.fold]
        return manifest.subset(train_idx), manifest.subset(val_idx)

    # Split whole groups; each group is stratified by its most common label set.
    by_group = pd.DataFrame({"group": groups, "stratum": strata})
    per_group = by_group.groupby("group", sort=True)["stratum"].agg(lambda s: s.value_counts().index[0])
    group_ids, group_strata = per_group.index.to_numpy(), per_group.to_numpy()
    counts = Counter(group_strata)
    group_strata = np.array([s if counts[s] >= 2 else "rare" for s in group_strata])
    try:
        _, val_groups = train_test_split(group_ids, test_size=data.val_fraction,
                                         stratify=group_strata, random_state=data.seed)
    except ValueError as e:  # too few images to keep every stratum on both sides
        log.warning("%s: split not stratified (%s)", manifest.source, e)
        _, val_groups = train_test_split(group_ids, test_size=data.val_fraction, random_state=data.seed)
    is_val = np.isin(groups, val_groups)
    return manifest.subset(np.flatnonzero(~is_val)), manifest.subset(np.flatnonzero(is_val))


# --- helpers ----------------------------------------------------------------------------------

class _Problems:
    """Collects bad-input findings; raises them together or drops the images they concern."""

    def __init__(self, mode: str, source: str):
        self.mode, self.source = mode, source
        self.lines: list[str] = []
        self.bad_images: set[str] = set()
        self.dropped: list[str] = []

    def add(self, image_id: str | None, message: str) -> None:
        self.lines.append(message)
        if image_id is not None:
            self.bad_images.add(image_id)

    def resolve(self, records: pd.DataFrame) -> pd.DataFrame:
        if not self.lines:
            return records
        if self.mode == "fail":
            raise DataError(f"{self.source}: {len(self.lines)} problem(s) in the input "
                            f"(set data.on_bad_input=drop to skip these images):\n" + _listing(self.lines, "\n  "))
        self.dropped = list(self.lines)
        log.warning("%s: dropped %d problem row(s)/image(s):\n  %s", self.source, len(self.lines),
                    _listing(self.lines, "\n  "))
        return records[~records["image_id"].isin(self.bad_images)].reset_index(drop=True)


def _listing(lines: list[str], sep: str = "; ") -> str:
    shown = sep.join(lines[:_MAX_LISTED])
    more = len(lines) - _MAX_LISTED
    return ("  " if sep.startswith("\n") else "") + shown + (f"{sep}... and {more} more" if more > 0 else "")


def _read_csv_rows(uri: str, s3: S3Config | None) -> list[tuple[int, list[str]]]:
    """(line number, fields) for every row, header first; line numbers as an editor shows them."""
    try:
        text = storage.read_text(uri, s3)
    except FileNotFoundError:
        raise DataError(f"{uri}: label file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{uri}: not a UTF-8 text CSV ({e})") from None
    reader = csv.reader(io.StringIO(text))
    try:
        return [(reader.line_num, row) for row in reader]
    except csv.Error as e:
        raise DataError(f"{uri}: row {reader.line_num}: malformed CSV ({e})") from None


def _well_formed(rows: list[tuple[int, list[str]]], width: int, problems: _Problems):
    """The data rows (after the header) that are not blank and have ``width`` fields; the others
    are reported."""
    for line, fields in rows[1:]:
        if not any(f.strip() for f in fields):
            continue
        if len(fields) != width:
            problems.add(None, f"row {line}: expected {width} fields, got {len(fields)}")
            continue
        yield line, fields


def _finish(records: pd.DataFrame, data: DataConfig, s3: S3Config | None, problems: _Problems, *,
            expected_size: tuple[int, int] | None = None, dedupe: bool = False,
            check_exist: bool = False) -> pd.DataFrame:
    """Check the images themselves (existence, decoding, size, duplicates), set the split group,
    then raise or drop everything found so far."""
    if "group" not in records:
        records["group"] = None
    if check_exist and not data.verify_images and not dedupe:
        present = _existing(records["uri"].tolist(), s3)
        for image_id, uri, row in zip(records["image_id"], records["uri"], records["row"]):
            if uri not in present:
                problems.add(image_id, f"row {row}: image {image_id} is listed but missing ({uri})")
    if data.verify_images or dedupe:
        digests = _scan(records, data, s3, problems, expected_size)
        records["digest"] = digests
        if dedupe:
            first: dict[str, str] = {}
            duplicates = []
            for image_id, digest in zip(records["image_id"], digests):
                if digest is None:
                    continue
                if digest in first:
                    duplicates.append(f"{image_id} (= {first[digest]})")
                else:
                    first[digest] = image_id
            if duplicates:
                log.warning("%s: dropped %d byte-identical duplicate image(s) before splitting: %s",
                            problems.source, len(duplicates), _listing(duplicates))
                keep = [d is None or first[d] == i for i, d in zip(records["image_id"], digests)]
                records = records[keep].reset_index(drop=True)
        # identical bytes never straddle a split, whatever their names
        records["group"] = records["group"].fillna(records["digest"])
        records = records.drop(columns="digest")
    records["group"] = records["group"].fillna(records["image_id"])
    records = problems.resolve(records)
    return records.drop(columns=[c for c in ("row",) if c in records])


def _existing(uris: list[str], s3: S3Config | None) -> set[str]:
    """The subset of ``uris`` that exist, with one listing per parent folder."""
    present: set[str] = set()
    for parent in sorted({posixpath.dirname(u) if storage.is_s3(u) else os.path.dirname(u) for u in uris}):
        try:
            present.update(storage.list_files(parent, s3, recursive=False))
        except FileNotFoundError:
            pass
    return present


def _scan(records: pd.DataFrame, data: DataConfig, s3: S3Config | None, problems: _Problems,
          expected_size: tuple[int, int] | None) -> list[str | None]:
    """Read every image concurrently, decode it, check its size; returns a content digest per
    image (None for images that could not be read)."""
    uris = records["uri"].tolist()
    ids = records["image_id"].tolist()
    rows = records["row"].tolist() if "row" in records else [None] * len(uris)
    digests: list[str | None] = [None] * len(uris)

    def check(i: int) -> str | None:
        where = f"row {rows[i]}: " if rows[i] is not None else ""
        try:
            blob = storage.read_bytes(uris[i], s3)
        except FileNotFoundError:
            return f"{where}image {ids[i]} is listed but missing ({uris[i]})"
        except OSError as e:
            return f"{where}{uris[i]}: cannot read ({type(e).__name__}: {e})"
        digests[i] = hashlib.sha1(blob).hexdigest()
        if not data.verify_images:
            return None
        try:
            image = decode_image(blob, 1, uris[i])
        except DataError as e:
            return f"{where}{e}"
        if expected_size and image.shape[:2] != expected_size:
            h, w = image.shape[:2]
            return (f"{where}{uris[i]}: size {w}x{h}, expected {expected_size[1]}x{expected_size[0]} "
                    f"(width x height)")
        return None

    # Threads overlap S3 round trips and PIL decoding (which releases the GIL).
    with ThreadPoolExecutor(max_workers=16) as pool:
        for i, message in enumerate(pool.map(check, range(len(uris)))):
            if message:
                problems.add(ids[i], message)
    return digests
