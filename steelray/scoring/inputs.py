"""A night's inputs: every file under a folder or S3 prefix, the lines of a manifest, or one image;
and which night it is (``score.run_date``, or today where the plant is, shifted) with ``{run_date}``
in ``score.input`` expanded to it."""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
import os
import string
import zoneinfo

from steelray import storage
from steelray.config import ScoreConfig
from steelray.scoring.plan import ScoreError
from steelray.storage import S3Config

log = logging.getLogger(__name__)


def night(sc: ScoreConfig, now: dt.datetime | None = None) -> dt.date:
    """``score.run_date``, or today in ``score.run_timezone`` plus ``score.run_date_offset`` days."""
    if sc.run_date:
        return dt.date.fromisoformat(sc.run_date)
    now = now or dt.datetime.now(dt.timezone.utc)
    return now.astimezone(zoneinfo.ZoneInfo(sc.run_timezone)).date() + dt.timedelta(days=sc.run_date_offset)


def expand_input(src: str, date: dt.date) -> str:
    """``src`` with ``{run_date}`` (ISO, or ``{run_date:%Y/%m/%d}``, any strftime format) as ``date``:
    the fixed entrypoint of a scheduled job names tonight's folder so. ``{{``/``}}``: literal braces."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(src) if name is not None}
    except ValueError as e:
        raise ScoreError(f"score.input {src}: {e} (a literal brace is written {{{{ or }}}})") from None
    unknown = sorted(names - {"run_date"})
    if unknown:
        raise ScoreError(f"score.input {src}: unknown placeholder(s) {', '.join('{' + n + '}' for n in unknown)}; "
                         "the only one is {run_date}")
    return src.format(run_date=date)


def list_inputs(sc: ScoreConfig, s3: S3Config | None) -> list[tuple[str, str]]:
    """(image_id, uri) of every input, in order, duplicates dropped with a warning."""
    src = sc.input
    if not src:
        raise ScoreError("score.input: required (a folder/prefix of images or a manifest file)")
    folder = storage.isdir(src, s3)
    if folder:
        uris = storage.list_files(src, s3, tuple(sc.suffixes))
        root = storage.absolute(src).rstrip("/" if storage.is_s3(src) else os.sep)
        root += "/" if storage.is_s3(src) else os.sep
        pairs = [(u[len(root):] if u.startswith(root) else u.rsplit("/", 1)[-1], u) for u in uris]
    elif src.lower().endswith((".txt", ".csv")):
        pairs = [(u.rsplit("/", 1)[-1], u) for u in _read_manifest(src, s3)]
    else:  # a manifest by another name (text), or one image: trying a model on a sheet, rescoring one
        if not storage.isfile(src, s3):
            raise ScoreError(f"score.input {src}: no such folder, prefix, manifest (.txt, .csv) or image file")
        try:
            storage.read_bytes(src, s3).decode("utf-8-sig")
            pairs = [(u.rsplit("/", 1)[-1], u) for u in _read_manifest(src, s3)]
        except UnicodeDecodeError:  # image formats are binary
            uri = storage.absolute(src)
            pairs = [(uri.rsplit("/", 1)[-1], uri)]
    seen: set[str] = set()
    out = []
    for image_id, uri in pairs:
        if uri in seen:
            continue
        seen.add(uri)
        out.append((image_id, uri))
    if len(out) < len(pairs):
        log.warning("%s: %d duplicate input(s) listed more than once, scored once", src, len(pairs) - len(out))
    if not out:  # a night without sheets, or the wrong prefix: the job succeeds, saying so
        log.warning("%s: no images to score (%s)", src, f"no files ending in {', '.join(sc.suffixes)}"
                    if folder else "the manifest lists none")
    return out


def _read_manifest(uri: str, s3: S3Config | None) -> list[str]:
    """URIs from a .txt (one per line, # comments) or .csv (column uri, path or image; else the first)."""
    try:
        text = storage.read_text(uri, s3)
    except FileNotFoundError:
        raise ScoreError(f"score.input {uri}: no such folder, prefix or manifest file") from None
    except UnicodeDecodeError as e:
        raise ScoreError(f"score.input {uri}: a manifest must be UTF-8 text; byte {e.start} is not") from None
    base = uri.rsplit("/", 1)[0] if storage.is_s3(uri) else os.path.dirname(storage.absolute(uri))
    if uri.lower().endswith(".csv"):
        rows = list(csv.reader(io.StringIO(text)))
        if not rows:
            raise ScoreError(f"{uri}: empty manifest")
        header = [h.strip().lower() for h in rows[0]]
        col = next((header.index(c) for c in ("uri", "path", "image", "imageid") if c in header), 0)
        entries = [(i + 2, r[col].strip() if len(r) > col else "") for i, r in enumerate(rows[1:])]
    else:
        entries = [(i + 1, line.strip()) for i, line in enumerate(text.splitlines())]
        entries = [(n, e) for n, e in entries if e and not e.startswith("#")]
    blank = [n for n, e in entries if not e]
    if blank:
        raise ScoreError(f"{uri}: line(s) {', '.join(map(str, blank[:10]))} have no image path")
    return [storage.join(base, e) for _, e in entries]
