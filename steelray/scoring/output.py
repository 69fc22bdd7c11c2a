"""The scoring output: Hive-partitioned Parquet under ``<output>/run_date=YYYY-MM-DD/``, one file per
group of rows, named by model version and images, each visible only when complete.

Here is everything that reads or changes it: the sink that writes it, what a job finds already done,
the family check (one output, one set of columns), the removal of error rows (``--retry-errors``),
the read-back verification, and ``read_output`` for whoever reads it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq
from ray.data import Datasink

from steelray import input_stats, storage
from steelray.scoring.plan import CLASSES_KEY, ScoreError, file_tag
from steelray.storage import S3Config

log = logging.getLogger(__name__)

PARTITIONING = pds.partitioning(pa.schema([("run_date", pa.string())]), flavor="hive")
_PART_NAME = re.compile(r"part-([0-9A-Za-z_]+)-[0-9a-f]{16}\.parquet$")


class VerificationError(ScoreError):
    """The output, read back after the write, misses an input, holds one twice, or holds files of
    another model family (written by a job that started beside this one)."""


class ParquetSink(Datasink):
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
        storage.write_atomic(storage.join(self.folder, name), buf.getvalue(), self.s3, self.retries)
        return {"rows": table.num_rows, "files": [name]}


def version_of(path: str) -> str | None:
    """The model version (file tag) a ``ParquetSink`` file is named for; None for other names."""
    m = _PART_NAME.search(path.rsplit("/", 1)[-1])
    return m.group(1) if m else None


def open_output(output: str, s3: S3Config | None) -> pds.Dataset | None:
    """The output's Parquet files as one dataset, listed afresh; None where it has none yet. Its
    columns are the first file's plus the input statistics where that file predates them (files
    without them read as nulls there): readers would otherwise drop them from every file."""
    dataset = storage.parquet_dataset(output, s3, PARTITIONING)
    if dataset is None or "width" not in dataset.schema.names or set(input_stats.STATS) <= set(dataset.schema.names):
        return dataset
    fields = list(dataset.schema)
    at = dataset.schema.get_field_index("width") + 1
    return dataset.replace_schema(pa.schema(fields[:at] + [pa.field(n, t) for n, t in input_stats.fields()] + fields[at:],
                                            metadata=dataset.schema.metadata))


def family_names(names: list[str]) -> list[str]:
    """The columns that make a model family: all but the input statistics, which files written
    before they existed lack (they read as nulls, ``open_output``)."""
    return [n for n in names if n not in input_stats.STATS and n != "run_date"]


def check_family(dataset: pds.Dataset | None, output: str, schema: pa.Schema) -> None:
    """Refuse to add files of other columns to an output: readers take the columns of the first
    file they open (pandas, pyarrow) and would drop the others' without a word. Checked on the first
    file and on one file of each model version (by its name): jobs of two families started at once
    on a new output each find the other's files only later, at the read-back or the next run."""
    if dataset is None:
        return
    first, seen = True, set()
    for path in dataset.files:
        version = version_of(path)
        if version in seen:
            continue
        seen.add(version)
        there = dataset.schema if first else pq.read_schema(path, filesystem=dataset.filesystem)
        have = family_names(there.names)
        if have != family_names(schema.names):
            classes = (there.metadata or {}).get(CLASSES_KEY, b"?").decode()
            missing = [n for n in family_names(schema.names) if n not in have]
            extra = [n for n in have if n not in schema.names]
            where = output if first else f"{output} ({path})"
            raise ScoreError(f"{where}: holds predictions of another model family (classes {classes}; columns "
                             f"this job would add: {missing or 'none'}, columns it would lack: {extra or 'none'}); "
                             "files of different columns in one output are unreadable as one table, so score "
                             "this model into an output root of its own")
        first = False


def rows_for(dataset: pds.Dataset | None, output: str, digest: str, uris: list[str],
             s3: S3Config | None) -> pa.Table:
    """``source_uri``, ``error``, ``flagged`` (where there is such a column) and ``file`` (its URI)
    of the rows this model version has in ``output`` (opened as ``dataset``) for the images ``uris``.

    Files another model version wrote (by their name) are not opened, and rows are matched while
    they are read, so what is held is bounded by the inputs, not by the output's age (a year of
    nightly output is millions of rows); the time still grows with this version's files (one footer
    read each). Hidden files (``.``/``_``: unfinished writes, locks, summaries) are not read."""
    empty = pa.table({"source_uri": pa.array([], pa.string()), "error": pa.array([], pa.string()),
                      "file": pa.array([], pa.string())})
    if dataset is None or "checkpoint" not in dataset.schema.names or not uris:
        return empty
    ours = [f for f in dataset.files if version_of(f) in (None, file_tag(digest))]
    if len(ours) < len(dataset.files):
        dataset = storage.parquet_dataset(output, s3, PARTITIONING, [storage.dataset_uri(output, f) for f in ours])
    if dataset is None:
        return empty
    wanted = pa.array(sorted(set(uris)), pa.string())
    # The range is implied by the set; unlike the set, Parquet's per-column min/max lets the reader
    # skip whole files of other nights unread.
    filt = ((pc.field("checkpoint") == digest) & (pc.field("source_uri") >= wanted[0].as_py())
            & (pc.field("source_uri") <= wanted[-1].as_py()) & pc.field("source_uri").isin(wanted))
    columns = [c for c in ("source_uri", "error", "flagged") if c in dataset.schema.names] + ["__filename"]
    table = dataset.to_table(columns=columns, filter=filt)
    files = [storage.dataset_uri(output, f) for f in table.column("__filename").to_pylist()]
    return table.drop_columns(["__filename"]).append_column("file", pa.array(files, pa.string()))


def drop_rows(digest: str, rows: pa.Table, s3: S3Config | None, retries: int) -> int:
    """Remove this version's error rows of the images in ``rows`` (``source_uri`` and ``file``, from
    ``rows_for``); returns how many went. Each file that holds some is rewritten whole under its own
    name (``storage.write_atomic``: locally a rename, on S3 one PUT, so readers see the old file or
    the new one), or deleted when nothing is left in it."""
    by_file: dict[str, set[str]] = {}
    for uri, file in zip(rows.column("source_uri").to_pylist(), rows.column("file").to_pylist()):
        by_file.setdefault(file, set()).add(uri)
    for folder in {f.rsplit("/", 1)[0] for f in by_file}:  # left by a job killed while rewriting
        remove_stale_temporaries(folder, digest)
    removed = 0
    for file, uris in sorted(by_file.items()):
        table = pq.read_table(io.BytesIO(storage.read_bytes(file, s3, retries)))
        drop = pc.and_(pc.and_(pc.equal(table.column("checkpoint"), digest),
                               pc.is_in(table.column("source_uri"), pa.array(sorted(uris), pa.string()))),
                       pc.is_valid(table.column("error")))
        keep = table.filter(pc.invert(pc.fill_null(drop, False)))
        removed += table.num_rows - keep.num_rows
        if not keep.num_rows:
            storage.remove(file, s3)
            continue
        buf = io.BytesIO()
        pq.write_table(keep, buf, compression="zstd")
        storage.write_atomic(file, buf.getvalue(), s3, retries)
    log.info("removed %d error row(s) from %d file(s) to score those inputs again", removed, len(by_file))
    return removed


def remove_stale_temporaries(folder: str, digest: str) -> int:
    """Unfinished files of this model version, left by a job killed while writing. Only this
    version's: a job of another version may be writing beside it (the run lock is per version).
    S3 has none: an object appears whole on its PUT or not at all."""
    if storage.is_s3(folder):
        return 0
    stale = [f for f in storage.list_names(folder) if f.startswith(f".part-{file_tag(digest)}-") and f.endswith(".tmp")]
    for f in stale:
        os.remove(os.path.join(folder, f))
    return len(stale)


def verify(output: str, digest: str, schema: pa.Schema, uris: list[str], s3: S3Config | None) -> pa.Table:
    """Re-read the output after the write: every one of ``uris`` exactly once for this version, and
    no file of another family beside ours (else VerificationError). Returns their rows."""
    dataset = open_output(output, s3)
    try:
        check_family(dataset, output, schema)
    except ScoreError as e:  # a job of another model family wrote here meanwhile
        raise VerificationError(f"output {output} failed verification: {e}") from None
    rows = rows_for(dataset, output, digest, uris, s3)
    counts = pc.value_counts(rows.column("source_uri")).to_pylist() if rows.num_rows else []
    dupes = [c["values"] for c in counts if c["counts"] > 1]
    missing = set(uris) - {c["values"] for c in counts}
    if missing or dupes:
        raise VerificationError(f"output {output} failed verification: {len(missing)} input(s) missing "
                                f"(e.g. {sorted(missing)[:3]}), {len(dupes)} duplicated (e.g. {dupes[:3]})")
    return rows


def read_output(output: str, s3: S3Config | None = None, run_date: str = "", checkpoint: str = "") -> pa.Table:
    """The scoring output (one run date, or all; one model version, or all) as one table, with
    ``run_date`` as a column."""
    dataset = open_output(output, s3)
    if dataset is None:
        raise ScoreError(f"{output}: no scoring output there")
    filt = None
    if run_date:
        filt = pc.field("run_date") == run_date
    if checkpoint:
        by_version = pc.field("checkpoint") == checkpoint
        filt = by_version if filt is None else filt & by_version
    return dataset.to_table(filter=filt)
