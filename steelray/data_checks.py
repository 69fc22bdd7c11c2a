"""The bad-input checks every data reader runs (``steelray.data``): problems collected per row and
image and raised together (or the images dropped, counted), CSV rows read and checked for shape,
and the images themselves checked (present, decodable, the right size, byte-identical duplicates).
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor

import pandas as pd

from steelray import storage
from steelray.config import DataConfig
from steelray.images import DataError, decode_image
from steelray.storage import S3Config

log = logging.getLogger("steelray.data")  # its findings are the readers': logged under their name

_MAX_LISTED = 20  # problems spelled out in one error before "... and N more"


class Problems:
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
                            f"(set data.on_bad_input=drop to skip these images):\n" + listing(self.lines, "\n  "))
        self.dropped = list(self.lines)
        log.warning("%s: dropped %d problem row(s)/image(s):\n  %s", self.source, len(self.lines),
                    listing(self.lines, "\n  "))
        return records[~records["image_id"].isin(self.bad_images)].reset_index(drop=True)


def listing(lines: list[str], sep: str = "; ") -> str:
    shown = sep.join(lines[:_MAX_LISTED])
    more = len(lines) - _MAX_LISTED
    return ("  " if sep.startswith("\n") else "") + shown + (f"{sep}... and {more} more" if more > 0 else "")


def read_csv_rows(uri: str, s3: S3Config | None) -> list[tuple[int, list[str]]]:
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


def well_formed(rows: list[tuple[int, list[str]]], width: int, problems: Problems):
    """The data rows (after the header) that are not blank and have ``width`` fields; the others
    are reported."""
    for line, fields in rows[1:]:
        if not any(f.strip() for f in fields):
            continue
        if len(fields) != width:
            problems.add(None, f"row {line}: expected {width} fields, got {len(fields)}")
            continue
        yield line, fields


def finish(records: pd.DataFrame, data: DataConfig, s3: S3Config | None, problems: Problems, *,
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
                            problems.source, len(duplicates), listing(duplicates))
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


def _scan(records: pd.DataFrame, data: DataConfig, s3: S3Config | None, problems: Problems,
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
