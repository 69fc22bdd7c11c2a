"""The nightly scoring job: sheets from a prefix or manifest, through model actors, into Parquet.

    summary = score.run(config.load(None, ["score.input=s3://plant/incoming/2026-11-22/",
                                           "score.checkpoint=s3://models/neu/best",
                                           "score.output=s3://plant/predictions/"], config.ScoreJob))

Pipeline (Ray Data, streaming): the driver lists the inputs and drops those the output already holds
for this checkpoint; CPU tasks read the bytes (threads, S3 retries with backoff) and decode and
resize them as the checkpoint's preprocessing says (or, with ``score.decode=actor``, only read the
bytes and check the headers, and the actors decode: nvJPEG on GPU); a pool of model actors (one
checkpoint load each, GPU or CPU) normalises, predicts and builds the output rows; a Parquet datasink
writes each group of rows as one file, atomically.

Nothing lost, nothing twice: every input becomes one row, a prediction or an ``error``; a rerun skips
the images already in the output for the same checkpoint digest (with ``score.retry_errors``, those
with an error row are removed from it and scored again: ``drop_rows``); a file appears under its
final name only once it is complete (local: written hidden, then renamed; S3: one PUT), so a killed
job leaves nothing half-written for readers, and its rerun scores exactly what is missing. After the
write the driver re-reads the output and fails if any input is missing or duplicated. One job at a
time per output and model version (``runlock``): a second one would score every image again.

Output: ``<output>/run_date=YYYY-MM-DD/part-<checkpoint>-<hash>.parquet``, columns in README.md
("Output schema").
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import math
import os
import re
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq

from steelray import metrics, rle, storage
from steelray.config import S3Config, ScoreConfig, ScoreJob
from steelray.data import SEVERSTAL_SIZE, DataError, decode_image, probe_image
from steelray.preprocess import Preprocess
from steelray.runlock import LockError, LockHeld, RunLock

log = logging.getLogger(__name__)

# Class names that mean "no defect" for a multi-class classifier's any_defect flag and cascade gate.
NO_DEFECT_NAMES = {"ok", "no_defect", "nodefect", "no-defect", "none", "normal", "clean", "good", "0"}
CLASSES_KEY = b"steelray.classes"   # Parquet schema metadata: the class names behind the columns


class ScoreError(RuntimeError):
    """The job cannot start: bad input listing or checkpoint."""


class VerificationError(ScoreError):
    """The output, read back after the write, misses an input, holds one twice, or holds files of
    another model family (written by a job that started beside this one)."""


class OutputBusy(ScoreError):
    """Another job with the same model is writing this output (``runlock``)."""


def column_name(cls: str) -> str:
    """A class name as a column-name suffix: ``rolled-in_scale`` -> ``rolled_in_scale``."""
    return re.sub(r"\W+", "_", str(cls)).strip("_") or "class"


# --- checkpoints ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelInfo:
    """What the driver and the actors need to know about one checkpoint."""

    uri: str
    task: str
    classes: tuple[str, ...]        # output names: binary -> ("defect",)
    thresholds: tuple[float, ...]
    preprocess: Preprocess
    name: str                       # e.g. resnet18, unet-resnet34
    digest: str                     # sha256 of the weights and decision settings, first 16 hex digits
    data_format: str
    min_area: tuple[int, ...] = ()  # segmenters: per class, calibrated by jobs/evaluate.py (empty: 0)

    @property
    def segmenter(self) -> bool:
        return self.task == "segmentation"


def describe(uri: str, s3: S3Config | None = None, min_area: tuple[int, ...] = ()) -> ModelInfo:
    """The checkpoint at ``uri``; for a segmenter, ``min_area`` (``score.min_area``) replaces the
    checkpoint's own minimum mask areas, and so makes another model version (digest) where it
    differs from them."""
    from steelray import checkpoint  # torch: imported where needed, so decode workers stay light

    try:
        meta = checkpoint.read_meta(uri, s3)
        weights = storage.read_bytes(storage.join(uri, checkpoint.WEIGHTS), s3)
    except FileNotFoundError as e:
        raise ScoreError(f"checkpoint {uri}: {e}") from None
    task = meta["task"]
    classes = ("defect",) if task == "binary" else tuple(meta["classes"])
    model = meta.get("model", {})
    name = f"{model.get('arch')}-{model.get('name')}" if task == "segmentation" else str(model.get("name"))
    thresholds, own = tuple(meta["thresholds"]), tuple(meta.get("min_area") or ())
    differs = task == "segmentation" and min_area and tuple(min_area) != (own or (0,) * len(classes))
    min_area = tuple(min_area) if differs else own
    # The digest names the model version in the output: recalibrated thresholds (or other minimum
    # areas) make a new version, so a rerun scores again instead of skipping what the old settings
    # decided. With the checkpoint's own settings it is what it always was.
    decision = json.dumps({"thresholds": thresholds, "min_area": min_area}).encode()
    return ModelInfo(uri=uri, task=task, classes=classes, thresholds=thresholds,
                     preprocess=Preprocess.from_dict(meta["preprocess"]), name=name,
                     digest=hashlib.sha256(weights + decision).hexdigest()[:16],
                     data_format=meta.get("config", {}).get("data", {}).get("format", ""), min_area=min_area)


@dataclass(frozen=True)
class Plan:
    """The checkpoint(s) of one run and what follows from them: input shapes, columns, identity."""

    primary: ModelInfo                   # the classifier (cascade gate) or the only model
    segmenter: ModelInfo | None          # cascade's second stage
    expect_size: tuple[int, int] | None
    min_area: tuple[int, ...]

    @property
    def final(self) -> ModelInfo:
        return self.segmenter or self.primary

    @property
    def cascade(self) -> bool:
        return self.segmenter is not None

    @property
    def model_name(self) -> str:
        return f"{self.primary.name} > {self.segmenter.name}" if self.cascade else self.primary.name

    @property
    def digest(self) -> str:
        return f"{self.primary.digest}>{self.segmenter.digest}" if self.cascade else self.primary.digest

    @property
    def models(self) -> list[ModelInfo]:
        return [self.primary] + ([self.segmenter] if self.segmenter else [])

    @property
    def inputs(self) -> list[Preprocess]:
        """The distinct model inputs to decode each image into (one, or two for a cascade)."""
        out: list[Preprocess] = []
        for m in self.models:
            if not any(_same_input(m.preprocess, p) for p in out):
                out.append(m.preprocess)
        return out

    def input_index(self, m: ModelInfo) -> int:
        return next(i for i, p in enumerate(self.inputs) if _same_input(m.preprocess, p))

    def schema(self) -> pa.Schema:
        fields = [("image_id", pa.string()), ("source_uri", pa.string()), ("model", pa.string()),
                  ("checkpoint", pa.string()), ("scored_at", pa.timestamp("us", tz="UTC")),
                  ("height", pa.int32()), ("width", pa.int32())]
        if self.cascade:
            fields += [(f"gate_prob_{column_name(c)}", pa.float32()) for c in self.primary.classes]
            fields.append(("flagged", pa.bool_()))
        fields += [(f"prob_{column_name(c)}", pa.float32()) for c in self.final.classes]
        if self.final.segmenter:
            fields += [(f"rle_{column_name(c)}", pa.string()) for c in self.final.classes]
            fields += [(f"area_{column_name(c)}", pa.int64()) for c in self.final.classes]
        fields += [("labels", pa.list_(pa.string())), ("any_defect", pa.bool_()), ("error", pa.string())]
        return pa.schema(fields, metadata={CLASSES_KEY: json.dumps(list(self.final.classes))})


def _same_input(a: Preprocess, b: Preprocess) -> bool:
    return tuple(a.size) == tuple(b.size) and a.in_chans == b.in_chans


def make_plan(sc: ScoreConfig, s3: S3Config | None) -> Plan:
    if not sc.checkpoint:
        raise ScoreError("score.checkpoint: required (a checkpoint folder written by jobs/train.py)")
    min_area = tuple(sc.min_area)  # the final model's: the segmenter's in a cascade
    primary = describe(sc.checkpoint, s3, () if sc.segmenter else min_area)
    segmenter = describe(sc.segmenter, s3, min_area) if sc.segmenter else None
    if segmenter is not None:
        if primary.segmenter:
            raise ScoreError(f"score.checkpoint {sc.checkpoint}: a cascade gate must be a classifier, "
                             "this is a segmenter (give the segmenter as score.segmenter)")
        if not segmenter.segmenter:
            raise ScoreError(f"score.segmenter {sc.segmenter}: not a segmenter checkpoint "
                             f"(task {segmenter.task})")
    final = segmenter or primary
    if sc.min_area and len(sc.min_area) != len(final.classes):
        raise ScoreError(f"score.min_area: one value per class ({', '.join(final.classes)}), "
                         f"got {sc.min_area}")
    if sc.expect_size:
        expect = tuple(sc.expect_size)
    elif "severstal" in (primary.data_format, final.data_format):
        expect = SEVERSTAL_SIZE
    else:
        expect = None
    return Plan(primary, segmenter, expect, tuple(sc.min_area) or final.min_area or (0,) * len(final.classes))


# --- inputs and what is already done -------------------------------------------------------------

def list_inputs(sc: ScoreConfig, s3: S3Config | None) -> list[tuple[str, str]]:
    """(image_id, uri) of every input, in order, duplicates dropped with a warning."""
    src = sc.input
    if not src:
        raise ScoreError("score.input: required (a folder/prefix of images or a manifest file)")
    folder = storage.isdir(src, s3)
    if folder:
        uris = storage.list_files(src, s3, tuple(sc.suffixes))
        root = (src.rstrip("/") + "/" if storage.is_s3(src)   # list_files gives absolute local paths
                else os.path.abspath(os.path.expanduser(src)) + os.sep)
        pairs = [(u[len(root):] if u.startswith(root) else u.rsplit("/", 1)[-1], u) for u in uris]
    elif src.lower().endswith((".txt", ".csv")):
        pairs = [(u.rsplit("/", 1)[-1], u) for u in _read_manifest(src, s3)]
    else:  # a manifest by another name (text), or one image: trying a model on a sheet, rescoring one
        fs, path = storage.filesystem(src, s3)
        if not fs.isfile(path):
            raise ScoreError(f"score.input {src}: no such folder, prefix, manifest (.txt, .csv) or image file")
        try:
            storage.read_bytes(src, s3).decode("utf-8-sig")
            pairs = [(u.rsplit("/", 1)[-1], u) for u in _read_manifest(src, s3)]
        except UnicodeDecodeError:  # image formats are binary
            uri = src if storage.is_s3(src) else path
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
    base = uri.rsplit("/", 1)[0] if storage.is_s3(uri) else os.path.dirname(os.path.abspath(os.path.expanduser(uri)))
    if uri.lower().endswith(".csv"):
        import csv

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


def done_uris(output: str, digest: str, s3: S3Config | None, schema: pa.Schema | None = None,
              uris: list[str] | None = None, files: bool = False) -> pa.Table:
    """``source_uri``, ``error`` and ``flagged`` (when present) of the rows already in ``output``
    for this checkpoint digest: of every such row, or (``uris``) of those rows whose image is one of
    ``uris``; with ``files``, also ``__filename``, the file holding the row. Hidden files
    (``.``/``_``: unfinished writes) are ignored. With ``schema`` (what this job writes), the output
    must hold files of the same columns.

    Files another model version wrote (by their name) are not opened. With ``uris``, the rows are
    matched while they are read, so what is held is bounded by the inputs, not by the output's age
    (a year of nightly output is millions of rows); the time still grows with the number of this
    version's files (one footer read each)."""
    dataset = _open_dataset(output, s3)
    empty = pa.table({"source_uri": pa.array([], pa.string()), "error": pa.array([], pa.string())})
    if dataset is not None and schema is not None:
        _same_family(output, dataset, schema)
    if dataset is None or "checkpoint" not in dataset.schema.names or uris == []:
        return empty
    ours = [f for f in dataset.files if _may_hold(f, digest)]
    if not ours:
        return empty
    if len(ours) < len(dataset.files):
        fs, base = storage.filesystem(output, s3)
        dataset = pds.dataset(ours, schema=dataset.schema, filesystem=fs, format="parquet",
                              partitioning=_PARTITIONING, partition_base_dir=base.rstrip("/"))
    columns = [c for c in ("source_uri", "error", "flagged") if c in dataset.schema.names]
    columns += ["__filename"] * files
    filt = pc.field("checkpoint") == digest
    if uris is not None:
        wanted = pa.array(sorted(set(uris)), pa.string())
        # The range is implied by the set; unlike the set, Parquet's per-column min/max lets the
        # reader skip whole files of other nights unread.
        filt &= (pc.field("source_uri") >= wanted[0].as_py()) & (pc.field("source_uri") <= wanted[-1].as_py())
        filt &= pc.field("source_uri").isin(wanted)
    return dataset.to_table(columns=columns, filter=filt)


_PARTITIONING = pds.partitioning(pa.schema([("run_date", pa.string())]), flavor="hive")
_PART_NAME = re.compile(r"part-([0-9A-Za-z_]+)-[0-9a-f]{16}\.parquet$")


def _may_hold(path: str, digest: str) -> bool:
    """False for a file this job's ``ParquetSink`` named for another model version."""
    m = _PART_NAME.search(path.rsplit("/", 1)[-1])
    return m is None or m.group(1) == file_tag(digest)


def _same_family(output: str, dataset: pds.Dataset, ours: pa.Schema) -> None:
    """Refuse to add files of other columns to an output: readers take the columns of the first
    file they open (pandas, pyarrow) and would drop the others' without a word. Checked on the first
    file and on one file of each model version (by its name): jobs of two families started at once
    on a new output each find the other's files only later, at the read-back or the next run."""
    first, seen = True, set()
    for path in dataset.files:
        m = _PART_NAME.search(path.rsplit("/", 1)[-1])
        version = m.group(1) if m else None
        if version in seen:
            continue
        seen.add(version)
        there = dataset.schema if first else pq.read_schema(path, filesystem=dataset.filesystem)
        have = [n for n in there.names if n != "run_date"]
        if have != ours.names:
            classes = (there.metadata or {}).get(CLASSES_KEY, b"?").decode()
            missing, extra = [n for n in ours.names if n not in have], [n for n in have if n not in ours.names]
            where = output if first else f"{output} ({path})"
            raise ScoreError(f"{where}: holds predictions of another model family (classes {classes}; columns "
                             f"this job would add: {missing or 'none'}, columns it would lack: {extra or 'none'}); "
                             "files of different columns in one output are unreadable as one table, so score "
                             "this model into an output root of its own")
        first = False


def _open_dataset(output: str, s3: S3Config | None) -> pds.Dataset | None:
    fs, path = storage.filesystem(output, s3)
    fs.invalidate_cache()  # all of it: s3fs drops only the path and its parents, and a file below may
    if not fs.isdir(path):  # have been rewritten since (drop_rows), its cached ETag then refused on read
        return None
    try:
        dataset = pds.dataset(path, filesystem=fs, format="parquet", partitioning=_PARTITIONING)
        return dataset if dataset.files else None  # e.g. only a running job's _running/ lock so far
    except (FileNotFoundError, pa.ArrowInvalid) as e:
        if "no files" in str(e).lower():
            return None
        raise


# --- stage 1: read and decode (CPU tasks) --------------------------------------------------------

def _read_all(uris: list[str], s3: S3Config | None, retries: int, threads: int) -> list[bytes | str]:
    """Each URI's bytes, or the error message saying why there are none."""
    def read(uri: str) -> bytes | str:
        try:
            fs, path = storage.filesystem(uri, s3, retries)
            with fs.open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return f"{uri}: not found (removed after it was listed, or never there)"
        except Exception as e:  # after the client's retries with backoff
            return f"{uri}: read failed after {retries} retries: {type(e).__name__}: {e}"

    with ThreadPoolExecutor(min(threads, len(uris)) or 1) as pool:
        return list(pool.map(read, uris))


def _size_error(uri: str, h: int, w: int, expect_size) -> str | None:
    if expect_size and (h, w) != tuple(expect_size):
        return (f"{uri}: unexpected size {w}x{h} (width x height), expected "
                f"{expect_size[1]}x{expect_size[0]}")
    return None


def read_and_decode(batch: dict, *, inputs: list[dict], expect_size, s3: S3Config | None,
                    retries: int, threads: int) -> dict:
    """Bytes -> uint8 (N, H, W, C) per model input, resized as the checkpoint's preprocessing says.
    Every failure becomes the row's ``error``; the image slot is then zeros."""
    import cv2

    uris = [str(u) for u in batch["source_uri"]]
    pres = [Preprocess.from_dict(p) for p in inputs]
    n = len(uris)
    images = [np.zeros((n, *p.size, p.in_chans), np.uint8) for p in pres]
    height, width = np.zeros(n, np.int32), np.zeros(n, np.int32)
    errors = [""] * n
    for i, (uri, blob) in enumerate(zip(uris, _read_all(uris, s3, retries, threads))):
        if isinstance(blob, str):
            errors[i] = blob
            continue
        decoded: dict[int, np.ndarray] = {}
        try:
            for k, p in enumerate(pres):
                if p.in_chans not in decoded:
                    decoded[p.in_chans] = decode_image(blob, p.in_chans, uri)
                img = decoded[p.in_chans]
                h, w = img.shape[:2]
                if problem := _size_error(uri, h, w, expect_size):
                    raise DataError(problem)
                if (h, w) != tuple(p.size):
                    img = cv2.resize(img, (p.size[1], p.size[0]), interpolation=cv2.INTER_LINEAR)
                images[k][i] = img.reshape(*p.size, p.in_chans)
            height[i], width[i] = h, w
        except DataError as e:
            errors[i] = str(e)
    out = {"image_id": np.asarray(batch["image_id"], dtype=object), "source_uri": np.asarray(uris, dtype=object),
           "height": height, "width": width, "error": np.asarray(errors, dtype=object)}
    for k, arr in enumerate(images):
        out[f"image_{k}"] = arr
    return out


def read_and_probe(batch: dict, *, expect_size, s3: S3Config | None, retries: int, threads: int) -> dict:
    """Stage 1 when the actors decode (``score.decode=actor``): the bytes themselves, with what the
    header alone tells (empty, not an image, unexpected size) as the row's ``error``. A JPEG
    crosses the object store at ~1/5 of its decoded size."""
    uris = [str(u) for u in batch["source_uri"]]
    n = len(uris)
    height, width = np.zeros(n, np.int32), np.zeros(n, np.int32)
    errors, blobs = [""] * n, [b""] * n
    for i, (uri, blob) in enumerate(zip(uris, _read_all(uris, s3, retries, threads))):
        if isinstance(blob, str):
            errors[i] = blob
            continue
        try:
            _, h, w = probe_image(blob, uri)
        except DataError as e:
            errors[i] = str(e)
            continue
        if problem := _size_error(uri, h, w, expect_size):
            errors[i] = problem
            continue
        height[i], width[i], blobs[i] = h, w, blob
    return {"image_id": np.asarray(batch["image_id"], dtype=object), "source_uri": np.asarray(uris, dtype=object),
            "height": height, "width": width, "error": np.asarray(errors, dtype=object),
            "blob": np.asarray(blobs + [None], dtype=object)[:n]}  # (the None keeps numpy from making a bytes array)


# --- stage 2: the model actors -------------------------------------------------------------------

class Scorer:
    """A Ray Data actor: loads the checkpoint(s) once, then turns decoded batches into output rows."""

    def __init__(self, plan: Plan, s3: S3Config | None, device: str, threads: int, compile: bool = False,
                 precision: str = "auto", decode: bool = False, batch: int = 0, compile_mode: str = "default",
                 compile_cache: str = ""):
        import torch

        from steelray import checkpoint, presets

        ours = logging.getLogger("steelray")
        if not logging.getLogger().handlers and not ours.handlers:  # a Ray worker: our lines to its log
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            ours.addHandler(handler)
            ours.setLevel(logging.INFO)
        if threads:
            torch.set_num_threads(threads)
        self.torch, self.presets, self.s3 = torch, presets, s3
        self.plan, self.device, self.decode = plan, torch.device(device), decode
        # A compiled model is specialised to one batch shape, and every new shape compiles again
        # (10-30 s on CPU). Short batches (the last one, rows dropped as errors, the sheets a cascade
        # gate flags) are padded to the next power of two, at most ``batch``: a few shapes at most,
        # each compiled once, and a cascade's segmenter still runs on about the sheets flagged.
        self.pad_to = batch if compile else 0
        self.fits: dict[str, int] = {}  # per model: at most this many images at once (it ran out of GPU memory)
        if precision == "auto":
            precision = "bf16-mixed" if self.device.type == "cuda" else "fp32"
        self.autocast = precision == "bf16-mixed"
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # every batch has the same shape: pick the fastest kernels once
        self.schema = plan.schema()
        self.cache = compile_cache_uri(compile_cache, plan, self.device, precision, compile_mode) if compile else ""
        self.cached: set[str] = set()  # graphs the cache file holds
        self.compiled = 0              # compiles seen in this process at the last save (or load)
        if self.cache:
            self._load_compile_cache()
        self.models, self.eager, self.proven = {}, {}, set()
        for info in plan.models:
            module, _ = checkpoint.load_model(info.uri, s3, device)
            module = module.to(memory_format=torch.channels_last, dtype=self.dtype)
            self.eager[info.uri] = module
            self.models[info.uri] = torch.compile(module, dynamic=False, mode=compile_mode) if compile else module

    def _compiles(self) -> int:
        """Graphs compiled so far in this process, from scratch or from torch's caches."""
        from torch._dynamo.utils import counters

        return counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_hit"]

    def _load_compile_cache(self) -> None:
        """Load torch's portable compile cache (``score.compile_cache``), so that compiling here
        reuses what an earlier actor compiled for the same models, kind of device and torch. Never
        fails the job: without the file, the actor compiles as it would have."""
        self.compiled = self._compiles()
        try:
            info = _load_cache_artifacts(storage.read_bytes(self.cache, self.s3))
            if info is None:  # torch logs what it could not read, and goes on
                raise ValueError("torch read no compiled graph from it")
            self.cached = set(info.artifacts.get("inductor", []))
            log.info("score.compile_cache: loaded %d compiled graph(s) from %s", len(self.cached), self.cache)
        except FileNotFoundError:
            log.info("score.compile_cache: nothing at %s yet; this actor compiles and writes it there", self.cache)
        except Exception as e:  # noqa: BLE001 - a cache it cannot read only costs the compile
            log.warning("score.compile_cache: could not load %s, compiling without it: %s: %s", self.cache,
                        type(e).__name__, e)

    def _save_compile_cache(self) -> None:
        """After a compile: if it made a graph the cache file lacks, write everything compiled or
        loaded in this process (so one file holds every batch shape) over that file, atomically."""
        self.compiled = self._compiles()
        try:
            saved = self.torch.compiler.save_cache_artifacts()
            graphs = set(saved[1].artifacts.get("inductor", [])) if saved else set()
            if graphs - self.cached:
                write_atomic(self.cache, saved[0], self.s3)
                self.cached |= graphs
                log.info("score.compile_cache: wrote %d compiled graph(s) to %s", len(graphs), self.cache)
        except Exception as e:  # noqa: BLE001 - the next run compiles again, nothing else is lost
            log.warning("score.compile_cache: could not write %s: %s: %s", self.cache, type(e).__name__, e)

    def _run(self, uri: str, x):
        """The model on ``x``. A compiled model compiles on its first call; if that fails (no C++
        compiler for the CPU backend, no Triton on the GPU node, an operator the compiler cannot
        take), a warning, and the job goes on with the eager model. A graph compiled here (first
        call, or a new batch shape) goes to ``score.compile_cache``."""
        model = self.models[uri]
        if model is self.eager[uri]:
            return model(x)
        if uri in self.proven:
            out = model(x)
        else:
            try:
                out = model(x)
            except self.torch.cuda.OutOfMemoryError:
                raise  # the batch, not the compile: _forward runs it in halves
            except Exception as e:  # noqa: BLE001 - whatever broke the compile, eager is the way on
                log.warning("score.compile: compiling %s failed on this node, scoring without it: %s: %s",
                            uri, type(e).__name__, (str(e).strip().splitlines() or [""])[0])
                self.models[uri] = self.eager[uri]
                return self.eager[uri](x)
            self.proven.add(uri)
        if self.cache and self._compiles() != self.compiled:
            self._save_compile_cache()
        return out

    def _forward(self, info: ModelInfo, images):
        """Probabilities for uint8 NHWC images (numpy, or a tensor already on the device): (N, C)
        classes, or (N, C, h, w) for segmenters. Where the model runs out of GPU memory on a batch,
        it runs on halves of it, and keeps that smaller size for the rest of the job (logged), so
        the default batch can suit a large GPU without failing the job on a small one."""
        torch = self.torch
        if isinstance(images, np.ndarray):
            with warnings.catch_warnings():  # Ray hands out read-only arrays; nothing here writes to them
                warnings.simplefilter("ignore", UserWarning)
                images = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
        n, parts, start = len(images), [], 0
        while start < n:
            size = min(n - start, self.fits.get(info.uri, n))
            try:
                parts.append(self._probs(info, images[start:start + size]))
            except torch.cuda.OutOfMemoryError:
                if size == 1:
                    raise
                self.fits[info.uri] = size // 2
                torch.cuda.empty_cache()
                log.warning("%s: a batch of %d images ran out of GPU memory; running %d at a time from now on "
                            "(score.batch_size=%d would start there)", info.name, size, size // 2, size // 2)
                continue
            start += size
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _probs(self, info: ModelInfo, images):
        """``_forward`` on at most one model batch, already on the device."""
        torch = self.torch
        p = info.preprocess
        n = len(images)
        most = min(self.pad_to, self.fits.get(info.uri, self.pad_to))
        padded = min(most, 1 << (n - 1).bit_length()) if self.pad_to else n
        if n < padded:
            images = torch.cat([images, images.new_zeros((padded - n, *images.shape[1:]))])
        x = self.presets.normalize_batch(images.permute(0, 3, 1, 2), p)  # NCHW view with channels_last strides
        x = x.to(self.dtype)
        with torch.inference_mode(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            logits = self._run(info.uri, x)[:n].float()
        if info.task == "multiclass":
            return logits.softmax(1)
        return logits.sigmoid()

    def _images(self, info: ModelInfo, batch: dict, idx: np.ndarray):
        """uint8 NHWC images of rows ``idx``: numpy from the decode tasks, or a tensor on the device
        when this actor decoded them (then ``batch["decoded"]`` holds one per input, rows in
        ``batch["decoded_rows"]`` order)."""
        k = self.plan.input_index(info)
        if "decoded" in batch:
            images, rows = batch["decoded"][k], batch["decoded_rows"]
            if len(idx) == len(rows):
                return images
            return images[self.torch.as_tensor(np.searchsorted(rows, idx), device=images.device)]
        images = batch[f"image_{k}"]
        return images if len(idx) == len(images) else images[idx]  # no copy when every row decoded

    def _decode(self, batch: dict, errors: list[str | None]) -> None:
        """``score.decode=actor``: the batch's bytes -> uint8 NHWC tensors on this actor's device,
        resized per model input; on CUDA the JPEGs go through nvJPEG in one batched call. A JPEG
        that does not end in its end-of-image marker (truncated), any other format, and any image
        the batched call fails on are decoded by ``decode_image`` on the CPU instead, which names
        what is wrong in ``errors`` exactly as the decode tasks would."""
        torch = self.torch
        from torchvision.io import ImageReadMode, decode_jpeg

        blobs, uris = batch["blob"], [str(u) for u in batch["source_uri"]]
        todo = [i for i, e in enumerate(errors) if e is None]
        decoded: dict[int, dict[int, object]] = {}       # in_chans -> row -> (C, H, W) uint8 tensor
        for chans in sorted({p.in_chans for p in self.plan.inputs}):
            got = decoded[chans] = {}
            mode = ImageReadMode.GRAY if chans == 1 else ImageReadMode.RGB
            jpegs = [i for i in todo if errors[i] is None and bytes(blobs[i][:2]) == b"\xff\xd8"
                     and bytes(blobs[i][-2:]) == b"\xff\xd9"]
            if jpegs:
                datas = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in jpegs]
                try:
                    got.update(zip(jpegs, decode_jpeg(datas, mode=mode, device=self.device)))
                except (RuntimeError, ValueError):  # one image it rejects fails the call: one by one
                    for i, d in zip(jpegs, datas):
                        try:
                            got[i] = decode_jpeg(d, mode=mode, device=self.device)
                        except (RuntimeError, ValueError):
                            pass  # the CPU decoder below says what is wrong with it
            for i in todo:
                if i not in got and errors[i] is None:
                    try:
                        img = decode_image(bytes(blobs[i]), chans, uris[i])
                    except DataError as e:
                        errors[i] = str(e)
                        continue
                    got[i] = torch.from_numpy(img.copy()).permute(2, 0, 1).to(self.device)  # PIL's array is read-only
        rows = np.array([i for i in todo if errors[i] is None], dtype=np.int64)
        out = []
        for p in self.plan.inputs:
            images = [decoded[p.in_chans][i] for i in rows]
            if not images:
                out.append(torch.zeros((0, *p.size, p.in_chans), dtype=torch.uint8, device=self.device))
                continue
            if all(im.shape == images[0].shape for im in images):
                x = self._resize(torch.stack(images), p.size)
            else:  # sheets of several sizes (no expect_size): one by one
                x = torch.cat([self._resize(im[None], p.size) for im in images])
            out.append(x.permute(0, 2, 3, 1).contiguous())   # NHWC, as the decode tasks hand it over
        batch["decoded"], batch["decoded_rows"] = out, rows

    def _resize(self, x, size):
        """uint8 NCHW -> ``size``, bilinear without antialiasing and rounding halves up, as
        cv2.INTER_LINEAR does in the decode tasks: the same pixels for whole-number ratios (1600 ->
        400 or 320); other ratios can differ by one grey level (OpenCV's fixed-point weights)."""
        if tuple(x.shape[-2:]) == tuple(size):
            return x
        y = self.torch.nn.functional.interpolate(x.float(), size=tuple(size), mode="bilinear", align_corners=False)
        return y.add_(0.5).floor_().clamp_(0, 255).to(self.torch.uint8)

    def __call__(self, batch: dict) -> pa.Table:
        plan, primary = self.plan, self.plan.primary
        n = len(batch["source_uri"])
        errors = [str(e) or None for e in batch["error"]]
        if self.decode:
            batch = dict(batch)
            self._decode(batch, errors)
        ok = np.flatnonzero([e is None for e in errors])
        rows: list[dict] = [{} for _ in range(n)]   # the model-dependent columns of each row
        if len(ok) and primary.segmenter:
            self._segment(primary, batch, ok, self._forward(primary, self._images(primary, batch, ok)), rows)
        elif len(ok):
            probs = self._forward(primary, self._images(primary, batch, ok)).cpu().numpy()
            prefix = "gate_prob_" if plan.cascade else "prob_"
            flagged: list[tuple[int, list[bool]]] = []
            for j, i in enumerate(ok):
                labels, defect = classify(primary, probs[j])
                row = rows[i]
                row.update({prefix + column_name(c): float(probs[j, k]) for k, c in enumerate(primary.classes)})
                if not plan.cascade:
                    row.update(labels=labels, any_defect=defect)
                    continue
                row["flagged"] = defect
                if defect:
                    flagged.append((int(i), gate_classes(primary, plan.segmenter, labels)))
                else:        # the gate says no defect: empty masks, the segmenter never sees it
                    for c in map(column_name, plan.segmenter.classes):
                        row[f"rle_{c}"], row[f"area_{c}"] = "", 0
                    row.update(labels=[], any_defect=False)
            if flagged:
                idx = np.array([i for i, _ in flagged])
                seg = plan.segmenter
                self._segment(seg, batch, idx, self._forward(seg, self._images(seg, batch, idx)), rows,
                              gates=[g for _, g in flagged])
        ok_set = set(ok.tolist())
        base = {"image_id": [str(v) for v in batch["image_id"]],
                "source_uri": [str(v) for v in batch["source_uri"]],
                "model": [plan.model_name] * n, "checkpoint": [plan.digest] * n,
                "scored_at": [dt.datetime.now(dt.timezone.utc)] * n,
                "height": [int(v) if i in ok_set else None for i, v in enumerate(batch["height"])],
                "width": [int(v) if i in ok_set else None for i, v in enumerate(batch["width"])],
                "error": errors}
        data = {f.name: base[f.name] if f.name in base else [r.get(f.name) for r in rows] for f in self.schema}
        return pa.Table.from_pydict(data, schema=self.schema)

    def _segment(self, info: ModelInfo, batch: dict, idx: np.ndarray, probs, rows: list[dict],
                 gates: list[list[bool]] | None = None) -> None:
        """Masks at each sheet's original size: upsample, per-class threshold, minimum area, RLE."""
        interpolate = self.torch.nn.functional.interpolate
        names = [column_name(c) for c in info.classes]
        peaks = probs.flatten(2).amax(2).cpu().numpy()
        for j, i in enumerate(idx):
            h, w = int(batch["height"][i]), int(batch["width"][i])
            full = interpolate(probs[j:j + 1], size=(h, w), mode="bilinear", align_corners=False)[0]
            row, found = rows[i], []
            for c, name in enumerate(names):
                mask = (full[c] >= info.thresholds[c]).cpu().numpy()
                area = int(mask.sum())
                if area < self.plan.min_area[c] or (gates is not None and not gates[j][c]):
                    area = 0
                row[f"prob_{name}"] = float(peaks[j, c])
                row[f"rle_{name}"], row[f"area_{name}"] = (rle.encode(mask) if area else ""), area
                if area:
                    found.append(info.classes[c])
            row.update(labels=found, any_defect=bool(found))


def classify(info: ModelInfo, probs: np.ndarray) -> tuple[list[str], bool]:
    """(labels, any_defect) of one image from a classifier's probabilities and thresholds."""
    if info.task == "multiclass":  # argmax, unless a calibrated class threshold says otherwise
        label = info.classes[int(metrics.decide("multiclass", probs[None], info.thresholds)[0])]
        return [label], label.lower() not in NO_DEFECT_NAMES
    found = [c for c, p, t in zip(info.classes, probs, info.thresholds) if p >= t]
    return found, bool(found)


def gate_classes(gate: ModelInfo, seg: ModelInfo, labels: list[str]) -> list[bool]:
    """Which of the segmenter's classes a flagged sheet may have: per class when the classifier is
    multi-label over the same classes, else all of them."""
    if gate.task == "multilabel" and list(gate.classes) == list(seg.classes):
        return [c in labels for c in seg.classes]
    return [True] * len(seg.classes)


# --- stage 3: atomic Parquet files ---------------------------------------------------------------

try:
    from ray.data import Datasink as _Datasink
except ImportError:  # pragma: no cover - Ray is a dependency; this keeps the module importable alone
    _Datasink = object


class ParquetSink(_Datasink):
    """One Parquet file per group of at least ``rows_per_file`` rows, named by a hash of its image
    URIs, made visible only when complete. Ray's ``write_parquet`` writes in place (a killed job
    leaves truncated files that readers pick up), hence this sink."""

    def __init__(self, folder: str, s3: S3Config | None, rows_per_file: int, retries: int):
        self.folder, self.s3, self.rows, self.retries = folder, s3, rows_per_file, retries

    @property
    def min_rows_per_write(self) -> int:
        return self.rows

    def get_name(self) -> str:
        return "WriteParquetAtomic"

    def write(self, blocks, ctx) -> dict:
        from ray.data.block import BlockAccessor

        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {"rows": 0, "files": []}
        table = pa.concat_tables(tables)
        # Named by the model version and the rows' images: a retried write replaces its own file,
        # and another model scoring the same images into the same output never replaces this one.
        versions = pc.unique(table.column("checkpoint")).to_pylist()
        digest = hashlib.sha1("\n".join(versions + table.column("source_uri").to_pylist()).encode()).hexdigest()
        name = f"part-{file_tag('+'.join(versions))}-{digest[:16]}.parquet"
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        write_atomic(storage.join(self.folder, name), buf.getvalue(), self.s3, self.retries)
        return {"rows": table.num_rows, "files": [name]}


def write_atomic(uri: str, data: bytes, s3: S3Config | None = None, retries: int | None = None) -> None:
    """Readers see the whole file or none of it: S3 objects appear whole on PUT; locally, write a
    hidden temporary file in the same folder, flush it to disk, and rename it into place."""
    fs, path = storage.filesystem(uri, s3, retries)
    if storage.is_s3(uri):
        fs.pipe_file(path, data)
        return
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_tag(digest: str) -> str:
    """A model version as it appears in file names (a cascade's ``gate>segmenter`` has a ``>``)."""
    return re.sub(r"[^0-9A-Za-z]+", "_", digest)


def _remove_stale_temporaries(folder: str, digest: str) -> int:
    """Unfinished files of this model version, left by a job killed while writing. Only this
    version's: a job of another version may be writing beside it (the run lock is per version)."""
    if storage.is_s3(folder) or not os.path.isdir(folder):
        return 0
    stale = [f for f in os.listdir(folder) if f.startswith(f".part-{file_tag(digest)}-") and f.endswith(".tmp")]
    for f in stale:
        os.remove(os.path.join(folder, f))
    return len(stale)


# --- the job -------------------------------------------------------------------------------------

@dataclass
class Summary:
    inputs: int
    skipped: int                  # already in the output for this checkpoint
    scored: int                   # new rows with a prediction
    errored: int                  # new rows with an error
    gate_skipped: int             # cascade: scored sheets the classifier did not flag
    seconds: float
    output: str                   # the run-date partition written to
    model: str
    checkpoint: str
    errors: list[str] = field(default_factory=list)  # the first few error messages
    retried: int = 0              # error rows removed to score their inputs again (score.retry_errors)

    @property
    def images_per_s(self) -> float:
        done = self.scored + self.errored
        return done / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        out = [f"inputs {self.inputs}: scored {self.scored}, errors {self.errored}, "
               f"skipped (already scored) {self.skipped}"
               + (f"; {self.retried} input(s) with an error row scored again" if self.retried else ""),
               f"{self.images_per_s:.1f} images/s over {self.seconds:.1f} s with {self.model} "
               f"(checkpoint {self.checkpoint})"]
        if self.gate_skipped:
            out.append(f"cascade: the classifier passed {self.gate_skipped} sheet(s) without segmenting them")
        out += [f"error: {e}" for e in self.errors]
        out.append(f"output: {self.output}")
        return out

    def write(self, root: str, s3: S3Config | None) -> str:
        """The summary as JSON under ``<root>/_runs/`` (readers of the predictions skip ``_`` folders),
        one file per finished job, for whatever watches the nightly runs; returns its URI."""
        finished = dt.datetime.now(dt.timezone.utc)
        uri = storage.join(root, "_runs", f"{finished:%Y-%m-%dT%H%M%S.%fZ}-{file_tag(self.checkpoint)}.json")
        body = {**asdict(self), "images_per_s": round(self.images_per_s, 2), "finished": finished.isoformat()}
        write_atomic(uri, json.dumps(body, indent=1).encode(), s3)
        return uri


def run(job: ScoreJob) -> Summary:
    sc, s3 = job.score, job.s3
    if not sc.output:
        raise ScoreError("score.output: required (a folder or s3:// prefix for the Parquet dataset)")
    plan = make_plan(sc, s3)
    run_date = sc.run_date or dt.datetime.now(dt.timezone.utc).date().isoformat()
    partition = storage.join(sc.output, f"run_date={run_date}")
    start = time.monotonic()
    inputs = list_inputs(sc, s3)
    out_root = sc.output if storage.is_s3(sc.output) else os.path.abspath(os.path.expanduser(sc.output))
    inputs = [(i, u) for i, u in inputs if not u.startswith(out_root.rstrip("/") + "/")]  # output inside input
    lock = None  # score.lock_ttl=0: the user makes sure that one job at a time writes this output
    if sc.lock_ttl:
        lock = RunLock(sc.output, file_tag(plan.digest), s3, ttl=sc.lock_ttl, what=f"{plan.model_name} on {sc.input}")
        try:
            lock.acquire()
        except LockHeld as e:
            raise OutputBusy(str(e)) from None
        except LockError as e:
            raise ScoreError(str(e)) from None
    try:
        summary = _score(plan, sc, s3, inputs, partition, start)
    finally:
        if lock:
            lock.release()
    try:
        summary.write(sc.output, s3)
    except Exception as e:  # noqa: BLE001 - the predictions are complete and verified; this is a report
        log.warning("could not write the run summary under %s/_runs: %s: %s", sc.output, type(e).__name__, e)
    return summary


def _score(plan: Plan, sc: ScoreConfig, s3: S3Config | None, inputs: list[tuple[str, str]], partition: str,
           start: float) -> Summary:
    """``run`` once this job holds the output for its model version."""
    import ray

    before = done_uris(sc.output, plan.digest, s3, plan.schema(), uris=[u for _, u in inputs],
                       files=sc.retry_errors)
    retried = 0
    if sc.retry_errors:
        failed = before.filter(pc.is_valid(before.column("error")))
        before = before.filter(pc.is_null(before.column("error")))
        # Removed before they are scored again: a job killed in between leaves these inputs missing,
        # which its rerun scores like any other, never an input with two rows.
        retried = drop_rows(sc.output, plan.digest, s3, failed, sc.retries) if failed.num_rows else 0
    done = set(before.column("source_uri").to_pylist())
    todo = [(i, u) for i, u in inputs if u not in done]
    skipped = len(inputs) - len(todo)
    print(f"score: {len(inputs)} input(s), {skipped} already scored by {plan.model_name} "
          f"({plan.digest}), {len(todo)} to score into {partition}"
          + (f" ({retried} with an error row, removed to score them again)" if retried else ""), flush=True)
    removed = _remove_stale_temporaries(partition, plan.digest)
    if removed:
        log.warning("%s: removed %d unfinished file(s) left by an interrupted run", partition, removed)
    if todo:
        if not ray.is_initialized():
            ray.init(address=sc.address or None)
        _pipeline(plan, sc, s3, todo, partition)
    summary = _verify(plan, sc, s3, inputs, todo, skipped, time.monotonic() - start, partition)
    summary.retried = retried
    return summary


def drop_rows(output: str, digest: str, s3: S3Config | None, rows: pa.Table, retries: int) -> int:
    """Remove from ``output`` this checkpoint's error rows of the images in ``rows`` (``source_uri``,
    ``__filename``: from ``done_uris(files=True)``); returns how many were removed. Each file that
    holds some is rewritten whole under its own name, as ``write_atomic`` writes (locally a rename, on
    S3 one PUT: readers see the old file or the new one), or deleted when nothing is left in it."""
    fs, _ = storage.filesystem(output, s3, retries)
    by_file: dict[str, set[str]] = {}
    for uri, path in zip(rows.column("source_uri").to_pylist(), rows.column("__filename").to_pylist()):
        by_file.setdefault(path, set()).add(uri)
    for folder in {os.path.dirname(p) for p in by_file}:  # left by a job killed while rewriting
        _remove_stale_temporaries(folder, digest)
    removed = 0
    for path, uris in sorted(by_file.items()):
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        drop = pc.and_(pc.and_(pc.equal(table.column("checkpoint"), digest),
                               pc.is_in(table.column("source_uri"), pa.array(sorted(uris), pa.string()))),
                       pc.is_valid(table.column("error")))
        keep = table.filter(pc.invert(pc.fill_null(drop, False)))
        removed += table.num_rows - keep.num_rows
        if not keep.num_rows:
            fs.rm(path)
            continue
        buf = io.BytesIO()
        pq.write_table(keep, buf, compression="zstd")
        write_atomic(f"s3://{path}" if storage.is_s3(output) else path, buf.getvalue(), s3, retries)
    log.info("removed %d error row(s) from %d file(s) to score those inputs again", removed, len(by_file))
    return removed


def placement(sc: ScoreConfig, gpus: float) -> tuple[str, int]:
    """The model actors' device and how many there are, for a cluster with ``gpus`` GPUs."""
    device = sc.device if sc.device != "auto" else ("cuda" if gpus else "cpu")
    if sc.actors:
        return device, sc.actors
    return device, (max(1, int(gpus / sc.actor_gpus + 1e-9)) if device == "cuda" else 1)


def model_batch(sc: ScoreConfig, device: str) -> int:
    """Images per model call: ``score.batch_size``, else 256 on GPU and 16 on CPU. On GPU, per-batch
    overhead idles the model less at 256 than at 64 (benchmarks/actor_feed.py: 0.99 against 0.77
    of the time busy), and the job on an H100 ran faster at 256 than at 128 (docs/benchmarks.md); a
    GPU too small for it runs halves (``Scorer._forward``)."""
    return sc.batch_size or (256 if device == "cuda" else 16)


def actor_calls(sc: ScoreConfig, device: str) -> int:
    """Batches a model actor takes at once: ``score.actor_calls``, else 4 on GPU, 1 on CPU. Above 1,
    the actor fetches and stitches its next batches while the model runs on the current one, so a
    model that waits on a GPU idles less between batches (benchmarks/actor_feed.py, which simulates
    that wait: at batch 256, 1 call 0.71-0.84 of the time busy, 2 calls 0.96-1.0, 4 calls 0.99; at
    batch 64 and 128 4 was best too). On CPU the model and that work share the same cores: no gain
    measured (docs/benchmarks.md), so one at a time."""
    return sc.actor_calls or (4 if device == "cuda" else 1)


# Images per model actor above which ``score.compile=auto`` compiles: where the compile (~20 s per
# actor, 10-35 s on 2 CPU cores) is paid back by the faster model (docs/benchmarks.md: resnet50 on an
# H100 ~1,450 -> ~2,000 img/s for the job, break-even ~50,000 images per actor; resnet18 on 2 CPU
# cores 15-17 -> 19-21 img/s steady, break-even ~2,000).
COMPILE_FROM = {"cuda": 50_000, "cpu": 2_000}


def _load_cache_artifacts(blob: bytes):
    """``torch.compiler.load_cache_artifacts``, but keeping every graph, now and in later saves. Each
    save appends the graphs
    compiled since the last one to the bytes as a new chunk, and torch's loader (2.11-2.14) turns the
    chunks into a dict by kind, so only the last chunk's graphs were loaded: an actor that compiled a
    second batch shape saved a file that gave back only that shape. Merged here; where torch's
    internals differ, its own loader."""
    import torch

    try:
        from torch.compiler._cache import CacheArtifactManager, _deserialize_single_cache
        from torch.utils._appending_byte_serializer import AppendingByteSerializer
    except ImportError:
        return torch.compiler.load_cache_artifacts(blob)
    CacheArtifactManager._ensure_cache_artifacts_registered()
    merged: dict[str, list] = {}
    for kind, artifacts in AppendingByteSerializer.to_list(blob, deserialize_fn=_deserialize_single_cache):
        merged.setdefault(kind, []).extend(artifacts)
    info = CacheArtifactManager.populate_caches(merged)
    # Recorded as this process's own, as a compile records what it makes: the next save writes them
    # too, so shapes this actor loads but never uses (tonight's last batch is another size) stay.
    for kind, artifacts in merged.items():
        for artifact in artifacts:
            if artifact not in CacheArtifactManager._seen_artifacts:
                CacheArtifactManager._new_cache_artifacts[kind].append(artifact)
                CacheArtifactManager._seen_artifacts.add(artifact)
    return info


def compile_cache_uri(folder: str, plan: Plan, device, precision: str, mode: str) -> str:
    """The ``score.compile_cache`` file for these models compiled in this mode and precision, on this
    kind of GPU (or CPU instruction set) with this torch: what is compiled for one does not serve
    another. Empty when no folder is set."""
    import torch

    if not folder:
        return ""
    kind = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu-{torch.backends.cpu.get_cpu_capability()}")
    key = "\n".join([*(m.digest for m in plan.models), kind, torch.__version__, precision, mode])
    name = "+".join(m.name for m in plan.models)
    return storage.join(folder, f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.torchcache")


def use_compile(sc: ScoreConfig, device: str, images: int, actors: int) -> bool:
    """``score.compile``: as set, or for ``auto`` whether each actor has enough images to win back
    the compile."""
    if isinstance(sc.compile, bool):
        return sc.compile
    return images / max(1, actors) >= COMPILE_FROM[device]


def _pipeline(plan: Plan, sc: ScoreConfig, s3: S3Config | None, todo: list[tuple[str, str]],
              partition: str) -> None:
    import ray
    from ray.data import ActorPoolStrategy

    device, actors = placement(sc, ray.cluster_resources().get("GPU", 0))
    threads = sc.actor_threads or max(1, int(sc.actor_cpus))
    compiled, calls = use_compile(sc, device, len(todo), actors), actor_calls(sc, device)
    how = "not compiled"
    if compiled:
        how = f"compiled ({sc.compile_mode}" + (f", cache in {sc.compile_cache})" if sc.compile_cache else ")")
    log.info("scoring %d images on %d %s actor(s), batch %d, %d batch(es) per actor at once, %s", len(todo),
             actors, device, model_batch(sc, device), calls, how)
    blocks = max(1, math.ceil(len(todo) / sc.decode_batch))
    ds = ray.data.from_items([{"image_id": i, "source_uri": u} for i, u in todo], override_num_blocks=blocks)
    s3_inputs = any(u.startswith("s3://") for _, u in todo)
    # Decode tasks reserve the memory their batch needs. Besides being true, it keeps Ray Data from
    # fusing decoding into the model actor when both ask for the same CPUs: fused, one process would
    # decode and predict in turn, with no overlap (seen on 2 CPUs: 0.62 of the bare model, 0.79 apart).
    in_actor = sc.decode == "actor"
    stage, extra = (read_and_probe, {}) if in_actor else (read_and_decode, {"inputs": [p.to_dict() for p in plan.inputs]})
    ds = ds.map_batches(stage, batch_size=sc.decode_batch, batch_format="numpy",
                        memory=_decode_memory(plan, sc, s3_inputs, in_actor),
                        fn_kwargs={"expect_size": plan.expect_size, "s3": s3, "retries": sc.retries,
                                   "threads": sc.read_threads, **extra})
    ds = ds.map_batches(
        Scorer, batch_size=model_batch(sc, device), batch_format="numpy",
        fn_constructor_kwargs={"plan": plan, "s3": s3, "device": device, "threads": threads,
                               "compile": compiled, "precision": sc.precision, "decode": in_actor,
                               "batch": model_batch(sc, device), "compile_mode": sc.compile_mode,
                               "compile_cache": sc.compile_cache},
        # calls > 1: the actor takes the next batch (fetches its blocks, copies them into one array)
        # while the model runs on this one; the model itself is never called concurrently.
        compute=ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=calls, enable_true_multi_threading=False),
        num_cpus=sc.actor_cpus,
        num_gpus=sc.actor_gpus if device == "cuda" else 0)
    ds.write_datasink(ParquetSink(partition, s3, sc.rows_per_file, sc.retries))


DECODE_WORKER_BYTES = 96 * 2**20
S3_CLIENT_BYTES = 64 * 2**20


def _decode_memory(plan: Plan, sc: ScoreConfig, s3_inputs: bool, bytes_only: bool = False) -> int:
    """Bytes a decode task holds: the worker process itself (Python, Ray, pyarrow, PIL, OpenCV; no
    torch: ~55 MiB above the images, measured by Ray Data on 2026-11-23; s3fs and botocore add about
    50 MiB more when inputs are on S3) plus its images decoded at full size (RGB at worst) and
    resized, twice over for the copies on the way out. When the actors decode, the task holds the
    bytes alone (a Severstal JPEG is ~0.2 byte per pixel), but Ray Data measured ~190 MiB per task
    of 64 sheets on a 16-core GPU machine (2026-11-23): counted as two bytes per pixel."""
    h, w = plan.expect_size or SEVERSTAL_SIZE
    per_image = 2 * h * w if bytes_only else h * w * 3 + sum(p.size[0] * p.size[1] * p.in_chans for p in plan.inputs)
    return DECODE_WORKER_BYTES + S3_CLIENT_BYTES * s3_inputs + 2 * sc.decode_batch * per_image


def _verify(plan: Plan, sc: ScoreConfig, s3: S3Config | None, inputs, todo, skipped: int,
            seconds: float, partition: str) -> Summary:
    """Re-read the output: every input exactly once for this checkpoint, else ScoreError."""
    wanted = {u for _, u in inputs}
    try:
        rows = done_uris(sc.output, plan.digest, s3, plan.schema(), uris=list(wanted))
    except ScoreError as e:  # a job of another model family wrote here meanwhile
        raise VerificationError(f"output {sc.output} failed verification: {e}") from None
    counts = pc.value_counts(rows.column("source_uri")).to_pylist() if rows.num_rows else []
    dupes = [c["values"] for c in counts if c["counts"] > 1 and c["values"] in wanted]
    missing = wanted - {c["values"] for c in counts}
    if missing or dupes:
        raise VerificationError(f"output {sc.output} failed verification: {len(missing)} input(s) missing "
                         f"(e.g. {sorted(missing)[:3]}), {len(dupes)} duplicated (e.g. {dupes[:3]})")
    new = rows.filter(pc.is_in(rows.column("source_uri"), pa.array([u for _, u in todo], pa.string())))
    err = new.column("error").to_pylist()
    errors = [e for e in err if e is not None]
    gate_skipped = 0
    if plan.cascade:
        flagged = new.column("flagged").to_pylist() if new.num_rows else []
        gate_skipped = sum(1 for f, e in zip(flagged, err) if e is None and f is False)
    return Summary(inputs=len(inputs), skipped=skipped, scored=len(err) - len(errors), errored=len(errors),
                   gate_skipped=gate_skipped, seconds=seconds, output=partition, model=plan.model_name,
                   checkpoint=plan.digest, errors=errors[:10])


# --- export --------------------------------------------------------------------------------------

def read_output(output: str, s3: S3Config | None = None, run_date: str = "", checkpoint: str = "") -> pa.Table:
    """The scoring output (one run date, or all; one model version, or all) as one table, with
    ``run_date`` as a column."""
    dataset = _open_dataset(output, s3)
    if dataset is None:
        raise ScoreError(f"{output}: no scoring output there")
    filt = None
    if run_date:
        filt = pc.field("run_date") == run_date
    if checkpoint:
        by_version = pc.field("checkpoint") == checkpoint
        filt = by_version if filt is None else filt & by_version
    return dataset.to_table(filter=filt)


def kaggle_rows(table: pa.Table) -> tuple[list[tuple[str, str, str]], int]:
    """Kaggle submission rows (ImageId, ClassId, EncodedPixels) for every scored image and every
    class of a segmenter's output, and the number of error rows left out."""
    raw = (table.schema.metadata or {}).get(CLASSES_KEY)
    rle_cols = [c for c in table.column_names if c.startswith("rle_")]
    if not rle_cols:
        raise ScoreError("the output has no rle_* columns: Kaggle's format needs a segmenter's masks")
    versions = sorted(pc.unique(table.column("checkpoint")).to_pylist()) if table.num_rows else []
    if len(versions) > 1:   # each image would appear once per model version
        raise ScoreError(f"the output holds {len(versions)} model versions ({', '.join(versions)}): "
                         "pick one (export_kaggle.py --checkpoint DIGEST)")
    classes = json.loads(raw) if raw else [c[len("rle_"):] for c in rle_cols]
    data = table.select(["image_id", "error"] + [f"rle_{column_name(c)}" for c in classes]).to_pylist()
    rows, skipped = [], 0
    for r in sorted(data, key=lambda r: r["image_id"]):
        if r["error"] is not None:
            skipped += 1
            continue
        rows += [(r["image_id"], c, r[f"rle_{column_name(c)}"] or "") for c in classes]
    return rows, skipped
