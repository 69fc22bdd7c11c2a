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

import logging
import os
import posixpath
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from steelray import data_checks as checks
from steelray import rle, storage
from steelray.config import Config, DataConfig
from steelray.images import IMAGE_SUFFIXES, SEVERSTAL_SIZE, DataError
from steelray.storage import S3Config

log = logging.getLogger(__name__)

SEVERSTAL_CLASSES = ["1", "2", "3", "4"]
NEU_CLASSES = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]
NEU_ABBREVIATIONS = {"cr": "crazing", "in": "inclusion", "pa": "patches", "ps": "pitted_surface",
                     "rs": "rolled-in_scale", "sc": "scratches"}  # NEU-CLS file names: Cr_1.bmp ...


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
                                + checks.listing([f"{iid} has {n}" for iid, n in bad]))
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
    rows = checks.read_csv_rows(csv_uri, s3)
    header = [h.strip() for h in rows[0][1]] if rows else []
    new_form, old_form = ["ImageId", "ClassId", "EncodedPixels"], ["ImageId_ClassId", "EncodedPixels"]
    if header not in (new_form, old_form):
        missing = [c for c in new_form if c not in header]
        raise DataError(f"{csv_uri}: header {','.join(header) or '(empty file)'}: expected "
                        f"ImageId,ClassId,EncodedPixels (or the older ImageId_ClassId,EncodedPixels); "
                        f"missing column(s): {', '.join(missing)}")

    problems = checks.Problems(data.on_bad_input, csv_uri)
    masks: dict[str, dict[int, str]] = defaultdict(dict)
    first_row: dict[tuple[str, int], int] = {}
    row_of_image: dict[str, int] = {}
    for line, fields in checks.well_formed(rows, len(header), problems):
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
    records = checks.finish(records, data, s3, problems, expected_size=SEVERSTAL_SIZE)
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
    problems = checks.Problems(data.on_bad_input, folder)
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
    records = checks.finish(records, data, s3, problems, dedupe=True)
    return Manifest(records, list(classes), folder, has_masks=False, dropped=problems.dropped)


def read_csv(data: DataConfig, s3: S3Config | None = None) -> Manifest:
    """A plain CSV: an image column (path relative to ``images_dir``/root, or a URI) and either one
    label column of class names or one 0/1 column per class. An empty label means defect-free."""
    csv_uri = storage.join(data.root, data.labels_csv)
    images_uri = storage.join(data.root, data.images_dir) if data.images_dir else data.root
    rows = checks.read_csv_rows(csv_uri, s3)
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

    problems = checks.Problems(data.on_bad_input, csv_uri)
    parsed, seen = [], {}
    for line, fields in checks.well_formed(rows, len(header), problems):
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
    records = checks.finish(records, data, s3, problems, check_exist=True)
    return Manifest(records, list(classes), csv_uri, has_masks=False, dropped=problems.dropped)


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
