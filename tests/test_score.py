"""The scoring job on a local Ray: real S3 (moto), real Parquet, checkpoints of untrained tiny models
(what is checked is the plumbing: outputs must equal the model applied directly, one image at a time)."""

from __future__ import annotations

import io
import json
import math
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from steelray import checkpoint, cluster, config, data, images, input_stats, model_io, models, rle, storage
from steelray.scoring import job as scoring_job
from steelray.scoring.actor import ActorSettings, Scorer
from steelray.scoring.compiled import CompiledModel, use_compile
from steelray.scoring.decode import read_and_decode
from steelray.scoring.inputs import list_inputs
from steelray.scoring.output import (ParquetSink, check_family, drop_rows, open_output, read_output,
                                     remove_stale_temporaries, rows_for)
from steelray.scoring.plan import CLASSES_KEY, ScoreError, describe, file_tag, make_plan

REPO = Path(__file__).resolve().parents[1]
SIZE = (64, 320)   # model input for the tests' checkpoints: sheets are resized 4x / 5x down
CLASSES = data.SEVERSTAL_CLASSES


def make_checkpoint(folder: Path, task: str, name: str, *, size=SIZE, thresholds=None, seed=0) -> str:
    cfg = config.load(None, [f"task={task}", f"model.name={name}", f"input.size=[{size[0]},{size[1]}]",
                             "data.format=severstal"])
    torch.manual_seed(seed)
    model = models.build_model(cfg, len(CLASSES))
    checkpoint.write(str(folder), model,
                     checkpoint.make_meta(cfg, CLASSES, models.preprocess_for(cfg), thresholds=thresholds))
    return str(folder)


def direct(ckpt: str, image_bytes: bytes) -> torch.Tensor:
    """The reference: one image through the plain module, as a notebook would, no Ray involved."""
    import cv2

    model, meta = checkpoint.load_model(ckpt)
    pre = model_io.Preprocess.from_dict(meta["preprocess"])
    img = images.decode_image(image_bytes, pre.in_chans)
    img = cv2.resize(img, (pre.size[1], pre.size[0]), interpolation=cv2.INTER_LINEAR).reshape(*pre.size, -1)
    x = (torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255 - torch.tensor(pre.mean).view(1, -1, 1, 1)) \
        / torch.tensor(pre.std).view(1, -1, 1, 1)
    with torch.no_grad():
        logits = model(x)
    return logits.softmax(1)[0] if meta["task"] == "multiclass" else logits.sigmoid()[0]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {"multilabel": make_checkpoint(root / "ml", "multilabel", "resnet10t"),
            "segmenter": make_checkpoint(root / "seg", "segmentation", "resnet18",
                                         thresholds=[0.95, 0.9, 0.5, 0.1])}


def bad_files(good: bytes) -> dict[str, bytes]:
    small = io.BytesIO()
    Image.fromarray(np.full((200, 200), 128, np.uint8)).save(small, format="JPEG")
    return {"truncated.jpg": good[: len(good) // 3], "empty.jpg": b"", "notes.txt": b"not an image at all\n",
            "small.jpg": small.getvalue()}


BAD_MESSAGES = {"truncated.jpg": "truncated", "empty.jpg": "empty file", "notes.txt": "not an image",
                "small.jpg": "unexpected size 200x200"}


def put_inputs(sheets, dest: str, n: int = 5) -> dict[str, bytes]:
    """n good sheets plus the four bad files under ``dest`` (local folder or s3:// prefix)."""
    names = sorted(os.listdir(sheets.images))[:n]
    files = {name: storage.read_bytes(os.path.join(sheets.images, name)) for name in names}
    files.update(bad_files(files[names[0]]))
    for name, blob in files.items():
        storage.write_bytes(storage.join(dest, name), blob)
    return files


def s3_settings() -> list[str]:
    """The test's S3 as overrides: they travel in the config (Ray workers do not share the test's environment)."""
    return [f"s3.{k}={os.environ[v]}" for k, v in [("endpoint_url", "AWS_ENDPOINT_URL"), ("region", "AWS_REGION"),
            ("access_key_id", "AWS_ACCESS_KEY_ID"), ("secret_access_key", "AWS_SECRET_ACCESS_KEY")] if v in os.environ]


def job(*overrides) -> config.ScoreJob:
    """A scoring config for the tests' small images and models."""
    return config.load(None, ["score.run_date=2026-11-22", "score.batch_size=4", "score.decode_batch=4",
                              *s3_settings(), *overrides], config.ScoreJob)


def read(output: str) -> pd.DataFrame:
    fs, path = storage.filesystem(output)
    fs.invalidate_cache()  # a file rewritten in place (--retry-errors) has another ETag than s3fs cached
    return pds.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table().to_pandas()


def test_prefix_on_s3_every_input_once_errors_named_and_rerun_adds_nothing(ray_local, bucket, sheets, ckpts):
    files = put_inputs(sheets, f"{bucket}/incoming")
    out = f"{bucket}/predictions"
    # actor_calls=4, the GPU default: the actor takes batches while the model runs on another
    summary = scoring_job.run(job(f"score.input={bucket}/incoming/", f"score.checkpoint={ckpts['multilabel']}",
                            f"score.output={out}", "score.actor_calls=4"))
    assert (summary.inputs, summary.scored, summary.errored, summary.skipped) == (9, 5, 4, 0)
    df = read(out)
    assert sorted(df.image_id) == sorted(files) and df.source_uri.is_unique
    assert set(df.run_date) == {"2026-11-22"} and summary.output == f"{out}/run_date=2026-11-22"
    for name, message in BAD_MESSAGES.items():
        row = df[df.image_id == name].iloc[0]
        assert message in row.error and name in row.error, row.error
        assert np.isnan(row.prob_1) and row.any_defect is None
        assert all(np.isnan(getattr(row, c)) for c in input_stats.STATS)
    good = df[df.error.isna()]
    assert len(good) == 5 and (good.height == 256).all() and (good.width == 1600).all()
    for row in good.itertuples():
        expected = direct(ckpts["multilabel"], files[row.image_id]).numpy()
        got = np.array([row.prob_1, row.prob_2, row.prob_3, row.prob_4])
        np.testing.assert_allclose(got, expected, atol=1e-4)
        assert list(row.labels) == [c for c, p in zip(CLASSES, expected) if p >= 0.5]
        assert row.any_defect == bool(len(row.labels))
        # the camera's side of each sheet, from the decoded image at its own size
        want = input_stats.sheet_stats(images.decode_image(files[row.image_id], 1))
        np.testing.assert_allclose([getattr(row, c) for c in input_stats.STATS], want, rtol=0.02, atol=2e-3)
    assert (df.checkpoint == describe(ckpts["multilabel"]).digest).all() and (df.model == "resnet10t").all()
    fs, path = storage.filesystem(out)

    def predictions() -> list[str]:
        return sorted(f for f in fs.find(path) if "/run_date=" in f)

    files_before = predictions()

    again = scoring_job.run(job(f"score.input={bucket}/incoming/", f"score.checkpoint={ckpts['multilabel']}",
                          f"score.output={out}", "score.run_date=2026-11-23"))
    assert (again.scored, again.errored, again.skipped) == (0, 0, 9)
    fs.invalidate_cache()
    assert predictions() == files_before and len(read(out)) == 9

    storage.write_bytes(f"{bucket}/incoming/late.jpg", files[sorted(files)[0]])  # one more sheet arrives
    late = scoring_job.run(job(f"score.input={bucket}/incoming/", f"score.checkpoint={ckpts['multilabel']}",
                         f"score.output={out}", "score.run_date=2026-11-23"))
    assert (late.scored, late.skipped) == (1, 9)
    df = read(out)
    assert len(df) == 10 and df.source_uri.is_unique
    assert df[df.image_id == "late.jpg"].run_date.tolist() == ["2026-11-23"]
    # each job's summary, as JSON beside the predictions (readers skip _runs/), in the order they ran
    fs.invalidate_cache()
    runs = [json.loads(fs.cat(f)) for f in sorted(fs.ls(f"{path}/_runs"))]
    assert [(r["scored"], r["errored"], r["skipped"]) for r in runs] == [(5, 4, 0), (0, 0, 9), (1, 0, 9)]
    assert runs[2]["output"] == f"{out}/run_date=2026-11-23" and runs[2]["checkpoint"] == late.checkpoint


def test_transient_s3_errors_are_retried_and_a_lasting_one_becomes_an_error_row(
        ray_local, bucket, sheets, ckpts, flaky_s3, load_job, capsys):
    """Inputs read through a proxy that answers 503: twice for one sheet (retried, then scored),
    always for another (an error row naming it, after exactly 1 + score.retries attempts), until
    a rerun with --retry-errors."""
    names = sorted(os.listdir(sheets.images))[:3]
    files = {n: storage.read_bytes(os.path.join(sheets.images, n)) for n in names}
    for n, blob in files.items():
        storage.write_bytes(f"{bucket}/incoming/{n}", blob)
    prefix = "incoming/"  # keys as the proxy sees them (bucket in the path, not the key)
    flaky_s3.fail.update({prefix + names[1]: 2, prefix + names[2]: 10**6})
    out = f"{bucket}/out"  # through the proxy too: the retried sheet's error row is rewritten on S3
    summary = scoring_job.run(job(f"score.input={bucket}/incoming/", f"score.checkpoint={ckpts['multilabel']}",
                            f"score.output={out}", "score.retries=3",
                            f"s3.endpoint_url={flaky_s3.endpoint}"))
    assert (summary.scored, summary.errored) == (2, 1), flaky_s3.seen
    df = read(out).set_index("image_id")
    assert pd.isna(df.loc[names[1], "error"])
    np.testing.assert_allclose(df.loc[names[1], [f"prob_{c}" for c in CLASSES]].to_numpy(float),
                               direct(ckpts["multilabel"], files[names[1]]).numpy(), atol=1e-4)
    error = df.loc[names[2]].error
    assert f"{bucket}/incoming/{names[2]}: read failed after 3 retries" in error and "Service Unavailable" in error, error
    assert flaky_s3.seen[prefix + names[2]] == 4, flaky_s3.seen  # the first try and 3 retries
    assert flaky_s3.seen[prefix + names[1]] >= 3

    # S3 is well again. A rerun counts the error row as done; with --retry-errors the sheet is read
    # again, scored, and its error row gives way to the prediction: still one row per sheet.
    flaky_s3.fail.clear()
    argv = [f"--input={bucket}/incoming/", f"--checkpoint={ckpts['multilabel']}", f"--output={out}",
            *s3_settings(), f"s3.endpoint_url={flaky_s3.endpoint}", "score.run_date=2026-11-23",
            "score.batch_size=4", "score.decode_batch=4"]
    assert load_job("score").main(argv) == 0
    assert "skipped (already scored) 3" in capsys.readouterr().out
    assert load_job("score").main([*argv, "--retry-errors"]) == 0
    assert "scored 1, errors 0, skipped (already scored) 2; 1 input(s) with an error row scored again" in capsys.readouterr().out
    df = read(out).set_index("image_id")
    assert len(df) == 3 and df.error.isna().all() and df.loc[names[2], "run_date"] == "2026-11-23"
    assert df.loc[names[0], "run_date"] == df.loc[names[1], "run_date"] == "2026-11-22"  # kept in the rewritten file
    np.testing.assert_allclose(df.loc[names[2], [f"prob_{c}" for c in CLASSES]].to_numpy(float),
                               direct(ckpts["multilabel"], files[names[2]]).numpy(), atol=1e-4)


def plain(column: pd.Series) -> list:
    """Python values, every kind of missing as None, lists as lists: for comparing readers."""
    return [list(v) if isinstance(v, (list, np.ndarray)) else None if pd.isna(v) else v for v in column]


@pytest.fixture(scope="module")
def seg_scored(ray_local, tmp_path_factory, sheets, ckpts):
    """3 good sheets and the 4 bad files scored by the segmenter into ``<root>/out``; the segmenter
    test adds a second model version there."""
    root = tmp_path_factory.mktemp("seg-scored")
    files = put_inputs(sheets, str(root / "in"), n=3)
    summary = scoring_job.run(job(f"score.input={root / 'in'}", f"score.checkpoint={ckpts['segmenter']}",
                            f"score.output={root / 'out'}"))
    return root, files, summary


def test_segmenter_rle_decodes_to_the_predicted_masks_and_min_area_drops_small_ones(seg_scored, ckpts, load_job):
    tmp_path, files, summary = seg_scored
    kaggle_rows = load_job("export_kaggle").kaggle_rows
    seg = ckpts["segmenter"]
    assert (summary.scored, summary.errored) == (3, 4)
    df = read(str(tmp_path / "out"))
    assert len(df) == 7
    thresholds = [0.95, 0.9, 0.5, 0.1]
    areas = []
    for row in df[df.error.isna()].itertuples():
        probs = direct(seg, files[row.image_id])
        full = torch.nn.functional.interpolate(probs[None], size=(256, 1600), mode="bilinear",
                                               align_corners=False)[0]
        for c, cls in enumerate(CLASSES):
            expected = (full[c] >= thresholds[c]).numpy()
            mask = rle.decode(getattr(row, f"rle_{cls}"), (256, 1600))
            assert (mask != expected).sum() <= 0.001 * expected.size, (row.image_id, cls)
            assert getattr(row, f"area_{cls}") == mask.sum()
            assert getattr(row, f"prob_{cls}") == pytest.approx(float(probs[c].max()), abs=1e-4)
            areas.append(int(mask.sum()))
        assert list(row.labels) == [c for c in CLASSES if getattr(row, f"area_{c}") > 0]
    assert 0 < min(a for a in areas if a) < max(areas), "the test needs masks of several sizes"

    rows, left_out = kaggle_rows(read_output(str(tmp_path / "out")))
    assert left_out == 4 and len(rows) == 3 * 4

    assert {(r[0], r[1]) for r in rows} == {(i, c) for i in df[df.error.isna()].image_id for c in CLASSES}

    # Other minimum areas make another model version, scored into the same output beside the first
    # (same images, same file grouping: its files must not replace the first version's).
    cut = sorted(a for a in areas if a)[len([a for a in areas if a]) // 2]
    other = job(f"score.input={tmp_path / 'in'}", f"score.checkpoint={seg}", f"score.output={tmp_path / 'out'}",
                f"score.min_area=[{cut},{cut},{cut},{cut}]")
    summary2 = scoring_job.run(other)
    assert (summary2.scored, summary2.errored, summary2.skipped) == (3, 4, 0)
    assert summary2.checkpoint != summary.checkpoint
    both = read(str(tmp_path / "out"))
    assert len(both) == 14 and set(both.checkpoint) == {summary.checkpoint, summary2.checkpoint}
    df2 = both[both.checkpoint == summary2.checkpoint].set_index("image_id")
    for row in df[df.error.isna()].itertuples():
        for cls in CLASSES:
            before = getattr(row, f"area_{cls}")
            assert df2.loc[row.image_id, f"area_{cls}"] == (before if before >= cut else 0)
    assert scoring_job.run(other).skipped == 7   # and that version's rerun adds nothing

    with pytest.raises(ScoreError, match="2 model versions"):
        kaggle_rows(read_output(str(tmp_path / "out")))
    csv_path = tmp_path / "submission.csv"
    done = subprocess.run([sys.executable, "jobs/export_kaggle.py", "--output", str(tmp_path / "out"),
                           "--checkpoint", summary2.checkpoint, "--to", str(csv_path)],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    exported = pd.read_csv(csv_path, keep_default_na=False)
    assert len(exported) == 3 * 4 and set(exported.ImageId) == set(df2[df2.error.isna()].index)
    for r in exported.itertuples():
        assert r.EncodedPixels == df2.loc[r.ImageId, f"rle_{r.ClassId}"]


@pytest.mark.parametrize("reader", ["duckdb", "spark"])
def test_duckdb_and_spark_read_the_rows_pandas_reads(seg_scored, reader, request):
    """The README's DuckDB query and ``spark.read.parquet(output)`` give pandas' rows: the same
    values, UTC timestamps, list-of-string labels, the run date as a column."""
    out = seg_scored[0] / "out"
    want = read(str(out)).sort_values(["image_id", "checkpoint"]).reset_index(drop=True)
    micros = (want.scored_at - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(microseconds=1)
    if reader == "duckdb":
        import duckdb

        got = duckdb.sql(f"SELECT * FROM read_parquet('{out}/*/*.parquet', hive_partitioning=true) "
                         "ORDER BY image_id, checkpoint").df()
        assert str(got.scored_at.dt.tz) in ("UTC", "Etc/UTC") and (got.scored_at == want.scored_at).all()
    else:
        from pyspark.sql import functions as F

        frame = request.getfixturevalue("spark").read.parquet(str(out))
        types = dict(frame.dtypes)
        assert (types["scored_at"], types["labels"], types["height"], types["prob_1"], types["area_1"]) == \
            ("timestamp", "array<string>", "int", "float", "bigint")
        # Spark's timestamp is an instant (UTC in the file); collect() would render it in local time
        frame = frame.withColumn("scored_at", F.unix_micros("scored_at"))
        got = pd.DataFrame([r.asDict() for r in frame.orderBy("image_id", "checkpoint").collect()])
        assert got.scored_at.tolist() == micros.tolist()
    assert list(got.columns) == list(want.columns) and len(got) == len(want) >= 7
    assert [str(d)[:10] for d in got.run_date] == want.run_date.tolist()
    for col in want.columns.drop(["scored_at", "run_date"]):
        assert plain(got[col]) == plain(want[col]), col


def test_output_files_are_named_by_model_version_and_images(tmp_path):
    def table(version: str, prob: float):
        return pa.table({"source_uri": ["s3://b/a.jpg", "s3://b/b.jpg"], "checkpoint": [version] * 2,
                         "prob_1": [prob, prob]})

    sink = ParquetSink(str(tmp_path), None, rows_per_file=10, retries=0)
    first = sink.write([table("v1", 0.1)], None)["files"]
    assert sink.write([table("v1", 0.2)], None)["files"] == first           # a retried write replaces its file
    assert sink.write([table("v2", 0.3)], None)["files"] != first           # another model's rows sit beside it
    got = pq.read_table(tmp_path).to_pandas()
    assert sorted(zip(got.checkpoint, got.prob_1)) == [("v1", 0.2), ("v1", 0.2), ("v2", 0.3), ("v2", 0.3)]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]
    assert first[0].startswith("part-v1-") and file_tag("ab12>cd34") == "ab12_cd34"
    # A killed v1 job's unfinished file is removed by the next v1 job; a v2 job writing beside it
    # keeps its own (each version's job holds its own lock).
    for version in ("v1", "v2"):
        (tmp_path / f".part-{version}-0123.parquet.99.tmp").write_bytes(b"half a file")
    assert remove_stale_temporaries(str(tmp_path), "v1") == 1
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == [".part-v2-0123.parquet.99.tmp"]


def test_what_is_done_is_read_from_this_versions_files_and_only_for_the_inputs(tmp_path):
    v1, v2 = "0123456789abcdef", "fedcba9876543210"

    def write(run_date: str, version: str, names: list[str], name: str = ""):
        table = pa.table({"source_uri": [f"s3://p/{n}.jpg" for n in names], "checkpoint": [version] * len(names),
                          "error": [None] * len(names)})
        if name:
            pq.write_table(table, tmp_path / f"run_date={run_date}" / name)
        else:
            ParquetSink(str(tmp_path / f"run_date={run_date}"), None, 10, 0).write([table], None)

    write("2026-11-21", v1, ["a", "b", "c"])
    write("2026-11-22", v1, ["d"])
    write("2026-11-21", v2, ["a", "b"])
    write("2026-11-22", v1, ["e"], name="part-0.parquet")                  # not named by ParquetSink: read
    write("2026-11-22", v1, ["x"], name=f"part-{v2}-0123456789abcdef.parquet")  # named for v2: not opened

    def done(uris: list[str], version: str = v1) -> list[str]:
        return sorted(rows_for(open_output(str(tmp_path), None), str(tmp_path), version, uris, None)
                      .column("source_uri").to_pylist())

    every = [f"s3://p/{n}.jpg" for n in "abcdexz"]
    assert done(every) == [f"s3://p/{n}.jpg" for n in "abcde"]
    assert done(["s3://p/a.jpg", "s3://p/d.jpg", "s3://p/z.jpg", "s3://p/a.jpg"]) == ["s3://p/a.jpg", "s3://p/d.jpg"]
    assert done([]) == []
    assert done(every, v2) == ["s3://p/a.jpg", "s3://p/b.jpg"]


def test_a_file_of_another_family_is_found_behind_the_first_file(tmp_path):
    """Readers take the first file's columns; two families' jobs started together on a new output
    leave one family's files behind the other's. Each version's first file is checked."""
    def write(run_date: str, version: str, prob: str):
        table = pa.table({"source_uri": [f"s3://p/{version}.jpg"], "checkpoint": [version], prob: [0.5],
                          "error": pa.array([None], pa.string())})
        return ParquetSink(str(tmp_path / f"run_date={run_date}"), None, 10, 0).write([table], None)["files"][0]

    v1, v2 = "0123456789abcdef", "fedcba9876543210"
    write("2026-11-21", v1, "prob_1")
    ours = pa.schema([("source_uri", pa.string()), ("checkpoint", pa.string()), ("prob_1", pa.float64()),
                      ("error", pa.string())])
    check_family(open_output(str(tmp_path), None), str(tmp_path), ours)
    other = write("2026-11-22", v2, "prob_crazing")
    with pytest.raises(ScoreError, match="holds predictions of another model family") as e:
        check_family(open_output(str(tmp_path), None), str(tmp_path), ours)
    assert other in str(e.value) and "columns this job would add: ['prob_1']" in str(e.value), e.value


def test_an_output_written_before_the_input_statistics_takes_new_rows_and_reads_whole(ray_local, tmp_path, sheets,
                                                                                   ckpts):
    """A night scored before the decode stage measured sheets (its file lacks the input_* columns) is
    the same family: the next night's job adds to the output, and ``read_output`` gives every row,
    with nulls where a sheet was not measured."""
    names = sorted(os.listdir(sheets.images))[:4]
    for k, name in enumerate(names):
        storage.write_bytes(str(tmp_path / f"in{k // 2}" / name), storage.read_bytes(os.path.join(sheets.images, name)))
    out = str(tmp_path / "out")
    scoring_job.run(job(f"score.input={tmp_path / 'in0'}", f"score.checkpoint={ckpts['multilabel']}", f"score.output={out}",
                        "score.run_date=2026-11-21"))
    (old,) = (tmp_path / "out" / "run_date=2026-11-21").glob("part-*.parquet")
    pq.write_table(pq.read_table(old).drop_columns(list(input_stats.STATS)), old)  # as the old job wrote it
    summary = scoring_job.run(job(f"score.input={tmp_path / 'in1'}", f"score.checkpoint={ckpts['multilabel']}",
                                  f"score.output={out}", "score.run_date=2026-11-22"))
    assert summary.scored == 2
    df = read_output(out).to_pandas().set_index("run_date")
    assert len(df) == 4 and set(input_stats.STATS) <= set(df.columns)
    assert df.loc["2026-11-21", list(input_stats.STATS)].isna().all().all()
    assert df.loc["2026-11-22", list(input_stats.STATS)].notna().all().all()


def test_dropping_error_rows_rewrites_only_this_versions_error_rows_of_those_images(tmp_path):
    """What --retry-errors does before scoring. A job killed right after it leaves those images out of
    the done set (missing, not twice), so its rerun scores them like new ones."""
    v1, v2 = "0123456789abcdef", "fedcba9876543210"
    sink = lambda run_date: ParquetSink(str(tmp_path / f"run_date={run_date}"), None, 10, 0)  # noqa: E731
    meta = {CLASSES_KEY: b'["1","2","3","4"]'}
    old = pa.table({"source_uri": ["s3://p/a.jpg", "s3://p/b.jpg", "s3://p/c.jpg"], "checkpoint": [v1] * 3,
                    "error": ["s3://p/a.jpg: read failed", None, "s3://p/c.jpg: truncated"]}).replace_schema_metadata(meta)
    kept_file = sink("2026-11-21").write([old], None)["files"][0]
    gone_file = sink("2026-11-22").write([pa.table({"source_uri": ["s3://p/d.jpg"], "checkpoint": [v1],
                                                    "error": ["s3://p/d.jpg: read failed"]})], None)["files"][0]
    sink("2026-11-22").write([pa.table({"source_uri": ["s3://p/a.jpg"], "checkpoint": [v2],
                                        "error": ["s3://p/a.jpg: read failed"]})], None)
    rows = rows_for(open_output(str(tmp_path), None), str(tmp_path), v1, ["s3://p/a.jpg", "s3://p/b.jpg", "s3://p/d.jpg"],
                    None)
    failed = rows.filter(pc.is_valid(rows.column("error")))
    assert sorted(failed.column("source_uri").to_pylist()) == ["s3://p/a.jpg", "s3://p/d.jpg"]

    assert drop_rows(v1, failed, None, retries=0) == 2
    kept = pq.read_table(tmp_path / "run_date=2026-11-21" / kept_file)     # same name, rewritten whole
    assert kept.column("source_uri").to_pylist() == ["s3://p/b.jpg", "s3://p/c.jpg"]   # c: not asked for
    assert kept.schema.metadata[CLASSES_KEY] == meta[CLASSES_KEY]
    assert not (tmp_path / "run_date=2026-11-22" / gone_file).exists()     # nothing left in it: deleted
    left = read_output(str(tmp_path)).to_pandas()
    assert sorted(left[left.checkpoint == v1].source_uri) == ["s3://p/b.jpg", "s3://p/c.jpg"]
    assert left[left.checkpoint == v2].source_uri.tolist() == ["s3://p/a.jpg"]
    assert not [f for f in os.listdir(tmp_path / "run_date=2026-11-21") if f.startswith(".")]


def test_cascade_segments_only_the_flagged_sheets(ray_local, tmp_path, sheets, ckpts):
    files = put_inputs(sheets, str(tmp_path / "in"), n=6)
    # A multi-label gate whose per-class threshold lets only the sheet it scores highest pass, so
    # that some sheets pass (some of their classes) and others do not.
    probe = make_checkpoint(tmp_path / "gate", "multilabel", "resnet10t", seed=3)
    probs = np.stack([direct(probe, files[n]).numpy() for n in sorted(files) if n.endswith(".jpg")
                      and n not in BAD_MESSAGES])
    gate = make_checkpoint(tmp_path / "gate", "multilabel", "resnet10t", seed=3,
                           thresholds=[float(np.sort(probs[:, c])[-2:].mean()) for c in range(4)])
    summary = scoring_job.run(job(f"score.input={tmp_path / 'in'}", f"score.checkpoint={gate}",
                            f"score.segmenter={ckpts['segmenter']}", f"score.output={tmp_path / 'out'}"))
    df = read(str(tmp_path / "out"))
    good = df[df.error.isna()]
    assert len(df) == 10 and len(good) == 6
    assert summary.gate_skipped == int((~good.flagged.astype(bool)).sum())
    scoring_job.run(job(f"score.input={tmp_path / 'in'}", f"score.checkpoint={ckpts['segmenter']}",
                  f"score.output={tmp_path / 'seg'}"))
    plain = read(str(tmp_path / "seg")).set_index("image_id")
    for row in good.itertuples():
        gate_probs = [getattr(row, f"gate_prob_{c}") for c in CLASSES]
        passes = [p >= t for p, t in zip(gate_probs, describe(gate).thresholds)]
        assert row.flagged == any(passes)
        for c, cls in enumerate(CLASSES):
            if row.flagged and passes[c]:
                assert getattr(row, f"rle_{cls}") == plain.loc[row.image_id, f"rle_{cls}"]
            else:
                assert getattr(row, f"rle_{cls}") == "" and getattr(row, f"area_{cls}") == 0
        if not row.flagged:
            assert np.isnan(row.prob_1) and list(row.labels) == [] and not row.any_defect
    assert 2 <= summary.gate_skipped < 6
    assert (df.model == "resnet10t > unet-resnet18").all()
    # the gate alone writes other columns (no masks): not into this output, where pandas would drop them
    with pytest.raises(ScoreError, match="holds predictions of another model family") as e:
        scoring_job.run(job(f"score.input={tmp_path / 'in'}", f"score.checkpoint={gate}", f"score.output={tmp_path / 'out'}"))
    assert "columns it would lack: ['gate_prob_1'" in str(e.value) and str(tmp_path / "out") in str(e.value)
    assert len(read(str(tmp_path / "out"))) == 10


def test_manifest_with_relative_paths_duplicates_and_a_missing_file(ray_local, tmp_path, sheets, ckpts):
    files = put_inputs(sheets, str(tmp_path / "in"), n=2)
    good = sorted(n for n in files if n not in BAD_MESSAGES)
    manifest = tmp_path / "in" / "tonight.txt"
    manifest.write_text(f"# tonight's sheets\n{good[0]}\n{good[1]}\n{good[0]}\nmissing.jpg\n")
    summary = scoring_job.run(job(f"score.input={manifest}", f"score.checkpoint={ckpts['multilabel']}",
                            f"score.output={tmp_path / 'out'}"))
    assert (summary.inputs, summary.scored, summary.errored) == (3, 2, 1)
    df = read(str(tmp_path / "out"))
    missing = df[df.image_id == "missing.jpg"].error.iloc[0]
    assert "missing.jpg" in missing and "not found" in missing


def test_one_image_as_the_input_and_inputs_that_are_none_of_the_kinds(tmp_path, bucket):
    (tmp_path / "sheet.jpg").write_bytes(b"\xff\xd8 a sheet")
    storage.write_bytes(f"{bucket}/in/sheet 2.jpg", b"\xff\xd8 another")
    inputs = lambda src: list_inputs(job(f"score.input={src}").score, None)  # noqa: E731
    assert inputs(tmp_path / "sheet.jpg") == [("sheet.jpg", str(tmp_path / "sheet.jpg"))]
    assert inputs(f"{bucket}/in/sheet 2.jpg") == [("sheet 2.jpg", f"{bucket}/in/sheet 2.jpg")]
    with pytest.raises(ScoreError, match=r"nope.jpg: no such folder, prefix, manifest \(.txt, .csv\) or image"):
        inputs(tmp_path / "nope.jpg")
    (tmp_path / "tonight.lst").write_text("sheet.jpg\n")  # a manifest by another name: still one
    assert inputs(tmp_path / "tonight.lst") == [("sheet.jpg", str(tmp_path / "sheet.jpg"))]
    (tmp_path / "list.txt").write_bytes(b"\xff\xd8 a JPEG named list.txt")
    with pytest.raises(ScoreError, match="list.txt: a manifest must be UTF-8 text; byte 0 is not"):
        inputs(tmp_path / "list.txt")


def test_bad_arguments_exit_2_with_the_reason(tmp_path, capsys, load_job):
    run = subprocess.run([sys.executable, "jobs/score.py", "--input", str(tmp_path), "--checkpoint",
                          str(tmp_path / "nope"), "--output", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 2 and "not a steelray checkpoint" in run.stderr, run.stderr
    code = load_job("score").main(["score.decode_batch=0"])
    err = capsys.readouterr().err
    assert code == 2 and "score.decode_batch: must be >= 1" in err, err


def test_killed_job_rerun_completes_without_duplicates_or_partial_files(ray_local, tmp_path, sheets):
    """A driver on the test's Ray is SIGKILLed after its first Parquet file; the rerun completes."""
    names = sorted(os.listdir(sheets.images))[:16]
    for name in names:
        storage.write_bytes(str(tmp_path / "in" / name), storage.read_bytes(os.path.join(sheets.images, name)))
    # A full-size resnet18 (~0.3 s a sheet here) so the job is still running when it is killed.
    ckpt = make_checkpoint(tmp_path / "ckpt", "multilabel", "resnet18", size=(256, 1600))
    out = tmp_path / "out"
    address = ray_local.get_runtime_context().gcs_address
    args = [sys.executable, "jobs/score.py", "--input", str(tmp_path / "in"), "--checkpoint", ckpt,
            "--output", str(out), f"score.address={address}", "score.run_date=2026-11-22",
            "score.rows_per_file=2", "score.batch_size=2", "score.decode_batch=2", "score.actor_calls=2"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    part = out / "run_date=2026-11-22"
    deadline = time.monotonic() + 240
    while not (part.is_dir() and any(f.startswith("part-") for f in os.listdir(part))):
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no output file within 240 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = read(str(out))                     # readable: no partial file is visible
    assert 0 < len(at_kill) < 16, "the job finished before it was killed: make it slower"
    assert at_kill.source_uri.is_unique

    summary = scoring_job.run(job(f"score.input={tmp_path / 'in'}", f"score.checkpoint={ckpt}", f"score.output={out}",
                            "score.rows_per_file=4"))
    df = read(str(out))
    assert len(df) == 16 and df.source_uri.is_unique and df.error.isna().all()
    assert summary.skipped >= len(at_kill) and summary.scored + summary.skipped == 16
    assert not [f for f in os.listdir(part) if f.startswith(".")], "temporary files left behind"
    assert not os.listdir(out / "_running"), "the rerun took the killed job's lock over and released it"


def test_a_second_job_on_the_same_output_and_model_is_refused_before_it_scores(tmp_path, sheets, ckpts,
                                                                               load_job, capsys):
    """Two jobs at once would both score every image: the second stops (exit 3), naming the first."""
    from steelray.scoring.lock import RunLock

    put_inputs(sheets, str(tmp_path / "in"), n=1)
    ckpt, out = ckpts["multilabel"], str(tmp_path / "out")
    with RunLock(out, file_tag(describe(ckpt).digest), what="the nightly job"):
        code = load_job("score").main(["--input", str(tmp_path / "in"), "--checkpoint", ckpt, "--output", out])
    assert code == 3 and re.search(r"another scoring job with this model is writing this output \(host .*, "
                                   r"pid .*, the nightly job, since", capsys.readouterr().err)
    assert os.listdir(out) == ["_running"] and not os.listdir(tmp_path / "out" / "_running")


def decoded_batch(sheets, plan, n=8) -> dict:
    names = sorted(os.listdir(sheets.images))[:n]
    uris = np.array([os.path.join(sheets.images, n) for n in names], dtype=object)
    return read_and_decode({"image_id": uris, "source_uri": uris}, inputs=[p.to_dict() for p in plan.inputs],
                                 expect_size=plan.expect_size, s3=None, retries=0, threads=4)


def assert_rows_agree(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Same probabilities within bf16's error; masks by overlap, not pixel for pixel (bf16 moves
    pixels near the threshold, and an untrained segmenter has many there)."""
    probs = [c for c in want.columns if c.startswith("prob_")]
    np.testing.assert_allclose(got[probs].to_numpy(), want[probs].to_numpy(), atol=0.03)
    for c in (c for c in want.columns if c.startswith("rle_")):
        for a, b in zip(want[c], got[c]):
            ma, mb = rle.decode(a, (256, 1600)), rle.decode(b, (256, 1600))
            union = (ma | mb).sum()
            assert union < 100 or (ma & mb).sum() / union >= 0.8, c


def test_scorer_in_bfloat16_matches_fp32(sheets, ckpts):
    """score.precision=bf16 (weights and inputs in bfloat16, no autocast) against fp32, on CPU."""
    for ckpt in (ckpts["multilabel"], ckpts["segmenter"]):
        plan = make_plan(job(f"score.checkpoint={ckpt}").score, None)
        batch = decoded_batch(sheets, plan, 4)
        fp32 = Scorer(plan, ActorSettings())(batch).to_pandas()
        bf16 = Scorer(plan, ActorSettings(precision="bf16"))
        assert {p.dtype for m in bf16.models.values() for p in m.module.parameters()} == {torch.bfloat16}
        assert_rows_agree(bf16(batch).to_pandas(), fp32)


def corrupt_middle(jpeg: bytes) -> bytes:
    """A JPEG with 2,000 bytes of noise in its entropy-coded data, start and end markers intact."""
    blob = bytearray(jpeg)
    blob[len(blob) // 2:len(blob) // 2 + 2000] = np.random.default_rng(0).bytes(2000)
    return bytes(blob)


def test_the_decode_tasks_name_what_is_wrong_with_each_file(tmp_path, sheets, ckpts):
    """A PNG is scored like a JPEG; a JPEG with noise in its data (its structure broken), a 12-bit
    JPEG and a 16-bit camera PNG are error rows naming the file and what is wrong."""
    files = put_inputs(sheets, str(tmp_path / "in"), n=2)
    first = files[sorted(files)[0]]
    png = io.BytesIO()
    Image.open(io.BytesIO(first)).save(png, format="PNG")
    sof = first.index(b"\xff\xc0")
    deep = io.BytesIO()
    Image.fromarray(np.full((256, 1600), 3000, np.uint16)).save(deep, format="PNG")  # a 16-bit camera's
    extra = {"png.png": png.getvalue(), "corrupt.jpg": corrupt_middle(first),
             "bits12.jpg": first[:sof + 4] + b"\x0c" + first[sof + 5:], "deep16.png": deep.getvalue()}
    for name, blob in extra.items():
        (tmp_path / "in" / name).write_bytes(blob)
    plan = make_plan(job(f"score.checkpoint={ckpts['multilabel']}").score, None)
    uris = np.array(sorted(str(p) for p in (tmp_path / "in").iterdir()), dtype=object)
    ids = np.array([os.path.basename(u) for u in uris], dtype=object)
    batch = read_and_decode({"image_id": ids, "source_uri": uris}, inputs=[p.to_dict() for p in plan.inputs],
                            expect_size=plan.expect_size, s3=None, retries=0, threads=4)
    errors = dict(zip(ids, batch["error"]))
    assert errors["png.png"] == "" and sum(1 for e in errors.values() if e) == 7
    assert "corrupt.jpg: unreadable or truncated image (corrupt JPEG data" in errors["corrupt.jpg"]
    assert "bits12.jpg: not an image" in errors["bits12.jpg"] or "bits12.jpg: unreadable" in errors["bits12.jpg"]
    assert "deep16.png: 16-bit greyscale PNG (mode I;16): the models take 8-bit images" in errors["deep16.png"]
    png_row, jpeg_row = list(ids).index("png.png"), list(ids).index(sorted(files)[0])
    assert (batch["image_0"][png_row] == batch["image_0"][jpeg_row]).all()  # the same pixels, however stored


def test_a_compiled_actor_compiles_once_for_short_batches_too(sheets, ckpts):
    """score.compile pads short batches to the next power of two (at most the batch size): a batch
    of 3 and the 3 rows left after an error reuse the graph compiled for 4 (a recompile costs
    10-30 s on CPU), and the rows match the eager model's."""
    from torch._dynamo.utils import counters

    plan = make_plan(job(f"score.checkpoint={ckpts['multilabel']}").score, None)
    full = decoded_batch(sheets, plan, 4)
    eager, compiled = Scorer(plan, ActorSettings()), Scorer(plan, ActorSettings(compile=True, batch=4))
    short = {k: v[:3] for k, v in full.items()}
    one_bad = dict(full, error=np.array(["", "x.jpg: broken", "", ""], dtype=object))
    torch._dynamo.reset()
    counters.clear()
    for batch in (full, short, one_bad):
        want, got = eager(batch).to_pandas(), compiled(batch).to_pandas()
        probs = [c for c in want.columns if c.startswith("prob_")]
        np.testing.assert_allclose(got[probs].to_numpy(float), want[probs].to_numpy(float), atol=1e-4, equal_nan=True)
        assert list(got.error.fillna("")) == list(want.error.fillna(""))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


class OutOfMemoryAbove(torch.nn.Module):
    """A model on a GPU that holds ``fits`` images at once: a larger batch fails as CUDA's allocator
    fails (there is no GPU here to fill; the ``-m gpu`` test below fills a real one)."""

    def __init__(self, model: torch.nn.Module, fits: int):
        super().__init__()
        self.model, self.fits, self.seen = model, fits, []

    def forward(self, x):
        self.seen.append(len(x))
        if len(x) > self.fits:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(x)} images' worth")
        return self.model(x)


def test_a_batch_that_runs_out_of_gpu_memory_runs_in_halves_from_then_on(sheets, ckpts, caplog):
    plan = make_plan(job(f"score.checkpoint={ckpts['multilabel']}").score, None)
    batch, uri = decoded_batch(sheets, plan, 8), plan.primary.uri
    want = Scorer(plan, ActorSettings())(batch).to_pandas()
    probs = [c for c in want.columns if c.startswith("prob_")]
    scorer = Scorer(plan, ActorSettings())
    tight = scorer.models[uri].module = OutOfMemoryAbove(scorer.models[uri].module, 3)
    with caplog.at_level(logging.WARNING, logger="steelray"):
        got = scorer(batch).to_pandas()
    assert tight.seen == [8, 4, 2, 2, 2, 2] and "a batch of 4 images ran out of GPU memory; running 2" in caplog.text
    np.testing.assert_allclose(got[probs].to_numpy(float), want[probs].to_numpy(float), atol=1e-6)
    tight.seen.clear()
    scorer(batch)
    assert tight.seen == [2, 2, 2, 2]   # the size that fits is kept

    # Compiled, running out of memory is no compile failure: the model stays compiled, and short
    # batches are padded to at most the size that fits (dynamo without inductor: no C++ build here).
    scorer = Scorer(plan, ActorSettings())
    model = scorer.models[uri]
    tight = OutOfMemoryAbove(model.module, 5)
    model.module = CompiledModel(tight, uri)
    model.module.compiled, model.pad_to = torch.compile(tight, backend="eager", dynamic=False), 8
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="steelray"):
        got = scorer(batch).to_pandas()
        short = scorer({k: v[:3] for k, v in batch.items()}).to_pandas()
    assert not model.module.failed and "failed on this node" not in caplog.text
    assert tight.seen == [8, 4, 4, 4] and len(short) == 3   # 3 rows padded to 4, not to 8
    np.testing.assert_allclose(got[probs].to_numpy(float), want[probs].to_numpy(float), atol=1e-6)
    np.testing.assert_allclose(short[probs].to_numpy(float), want[probs][:3].to_numpy(float), atol=1e-6)


COMPILE_CACHE_READER = """
import json, logging, sys
import numpy as np
from torch._dynamo.utils import counters
from steelray import config
from steelray.scoring.actor import ActorSettings, Scorer
from steelray.scoring.decode import read_and_decode
from steelray.scoring.plan import make_plan
logging.basicConfig(level=logging.INFO)
ckpt, folder, *uris = sys.argv[1:]
plan = make_plan(config.load(None, [f"score.checkpoint={ckpt}"], config.ScoreJob).score, None)
uris = np.array(uris, dtype=object)
batch = read_and_decode({"image_id": uris, "source_uri": uris}, inputs=[p.to_dict() for p in plan.inputs],
                        expect_size=plan.expect_size, s3=None, retries=0, threads=4)
scorer = Scorer(plan, ActorSettings(compile=True, batch=4, compile_cache=folder))
rows = scorer(batch).to_pandas()
hit, miss = counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
scorer({k: v[:1] for k, v in batch.items()})  # a shape the folder lacks: compiled, and a file added
print(json.dumps({"hit": hit, "miss": miss,
                  "probs": rows[[c for c in rows.columns if c.startswith("prob_")]].to_numpy(float).tolist()}))
"""


def test_compile_cache_is_written_once_per_shape_and_a_fresh_process_compiles_from_it(sheets, ckpts, tmp_path,
                                                                                      caplog):
    """score.compile_cache: an actor writes what it compiled, each batch shape once; an actor on a
    fresh node (here: a process with an empty inductor cache) loads every shape, compiles nothing it
    loaded, and adds a new shape; a cache file it cannot read is a warning, and the actor compiles
    as it would have."""
    plan = make_plan(job(f"score.checkpoint={ckpts['multilabel']}").score, None)
    batch = decoded_batch(sheets, plan, 4)
    folder = tmp_path / "cache"
    torch._dynamo.reset()
    scorer = Scorer(plan, ActorSettings(compile=True, batch=4, compile_cache=str(folder)))
    with caplog.at_level(logging.INFO, logger="steelray"):
        want = scorer(batch).to_pandas()
        (sub,) = os.listdir(folder)
        assert sub.startswith("resnet10t-") and len(os.listdir(folder / sub)) == 1
        scorer({k: v[:2] for k, v in batch.items()})  # another shape: compiled, and a file of its own
        assert len(os.listdir(folder / sub)) == 2
        scorer(batch)  # nothing new compiled: nothing written
    assert len(os.listdir(folder / sub)) == 2 and caplog.text.count("score.compile_cache: wrote") == 2
    probs = want[[c for c in want.columns if c.startswith("prob_")]].to_numpy(float)

    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "fresh-node")}
    args = [sys.executable, "-c", COMPILE_CACHE_READER, ckpts["multilabel"], str(folder), *batch["source_uri"]]
    fresh = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    got = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert (got["hit"], got["miss"]) == (1, 0), fresh.stderr[-3000:]
    loaded = re.search(r"loaded (\d+) compiled graph", fresh.stderr)
    assert loaded and int(loaded.group(1)) >= 2, fresh.stderr[-3000:]   # both shapes, from both files
    assert len(os.listdir(folder / sub)) == 3                            # its new shape (1 row) joined them
    np.testing.assert_allclose(got["probs"], probs, atol=1e-5)

    broken = tmp_path / "broken"
    (broken / sub).mkdir(parents=True)
    (broken / sub / "x.torchcache").write_bytes(b"not a torch cache")
    with caplog.at_level(logging.INFO, logger="steelray"):
        Scorer(plan, ActorSettings(compile=True, batch=4, compile_cache=str(broken)))
    assert f"could not load {broken / sub / 'x.torchcache'}, compiling without it" in caplog.text


def test_where_compiling_fails_the_actor_scores_uncompiled(sheets, ckpts, monkeypatch, caplog):
    """A node without a working C++ compiler (the CPU backend needs one): score.compile warns and
    the rows are the eager model's, instead of the job failing."""
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("/nonexistent/g++",))
    plan = make_plan(job(f"score.checkpoint={ckpts['multilabel']}").score, None)
    batch = decoded_batch(sheets, plan, 4)
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING, logger="steelray"):
        got = Scorer(plan, ActorSettings(compile=True, batch=4))(batch).to_pandas()
    assert "compiling" in caplog.text and "failed on this node" in caplog.text
    want = Scorer(plan, ActorSettings())(batch).to_pandas()
    probs = [c for c in want.columns if c.startswith("prob_")]
    np.testing.assert_allclose(got[probs].to_numpy(float), want[probs].to_numpy(float), atol=1e-6)


GPU_NODE, CPU_HEAD = {"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0}


@pytest.mark.parametrize("overrides, nodes, types, want", [
    ([], [{"CPU": 2.0}], [], ("cpu", 1, 1, 1)),
    ([], [{"CPU": 16.0}], [], ("cpu", 1, 8, 8)),                       # an actor's CPU and a decode task's
    ([], [GPU_NODE] * 4, [], ("cuda", 1, 4, 4)),
    (["score.actor_gpus=0.5"], [GPU_NODE] * 4, [], ("cuda", 1, 8, 8)),
    (["score.actor_gpus=0.34"], [GPU_NODE], [], ("cuda", 1, 2, 2)),
    ([], [CPU_HEAD], [(GPU_NODE, 8.0)], ("cuda", 1, 8, 1)),           # the night: no GPU node up yet
    ([], [CPU_HEAD, GPU_NODE, GPU_NODE], [(GPU_NODE, 8.0)], ("cuda", 1, 8, 2)),  # two of the eight up
    ([], [CPU_HEAD], [(GPU_NODE, math.inf)], ("cuda", 1, None, 1)),   # an autoscaler without a limit
    (["score.max_actors=2"], [GPU_NODE] * 4, [], ("cuda", 1, 2, 2)),
    (["score.actors=3"], [{"CPU": 2.0}], [], ("cpu", 3, 3, 3)),
    (["score.device=cpu", "score.actor_cpus=3"], [GPU_NODE] * 2, [], ("cpu", 1, 4, 4)),
    (["score.device=cuda"], [CPU_HEAD], [], ("cuda", 1, 1, 1)),
])
def test_the_pool_follows_the_gpus_the_cluster_has_or_can_start(overrides, nodes, types, want):
    place = scoring_job.placement(job(*overrides).score, cluster.Capacity(tuple(nodes), tuple(types)))
    assert (place.device, place.least, place.most, place.initial) == want


def test_a_cluster_too_small_for_an_actor_and_a_decode_task_is_refused_naming_what_is_missing(capsys):
    """After a lost node, one 1-CPU worker is left: the model actor would hold its only CPU and no
    decode task could start (Ray Data waits for ever). Refused with what is needed and what there
    is; with an autoscaler that can add a node that would do, the job says it waits for it."""
    sc = job().score
    small = cluster.Capacity(({"CPU": 0.0}, {"CPU": 1.0}))
    with pytest.raises(ScoreError, match=r"too small.*a model actor \{CPU 1\} and a decode task \{CPU 1\} at once.*"
                                         r"1 x \{nothing\}, 1 x \{CPU 1\}.*no autoscaler.*score.actor_cpus"):
        scoring_job._check_room(sc, small, scoring_job.placement(sc, small), {"CPU": 1.0})
    scoring_job._check_room(sc, cluster.Capacity(({"CPU": 2.0},)), scoring_job.placement(sc, small), {"CPU": 1.0})
    growing = cluster.Capacity(small.nodes, (({"CPU": 4.0}, 2.0),))
    scoring_job._check_room(sc, growing, scoring_job.placement(sc, growing), {"CPU": 1.0})
    assert "waiting for the autoscaler to start a node (up to 2 x {CPU 4})" in capsys.readouterr().out
    gpu = job("score.device=cuda").score
    with pytest.raises(ScoreError, match=r"\{CPU 1, GPU 1\}.*or score.device=cpu"):
        scoring_job._check_room(gpu, cluster.Capacity((CPU_HEAD,)), scoring_job.placement(gpu, small), {"CPU": 1.0})


def test_the_launchers_config_says_which_nodes_the_autoscaler_can_start(tmp_path):
    """cluster.yaml as `ray up` leaves it on the head: its GPU workers (declared resources, up to 8)."""
    assert cluster.launcher_types("cluster.yaml") == [({"CPU": 8.0, "GPU": 1.0}, 8.0)]
    assert cluster.launcher_types(str(tmp_path / "none.yaml")) == []


def test_capacity_reads_the_nodes_of_the_running_cluster_and_the_launchers_node_types(ray_local, tmp_path,
                                                                                      monkeypatch):
    """One node, no autoscaler: local paths are fine. The same on the head of a `ray up` cluster
    (its config where the launcher leaves it): GPU nodes can come, so auto means GPU, and local
    paths are refused before a worker node is even up."""
    cap = cluster.capacity()
    assert (cap.now("CPU"), cap.now("GPU"), cap.types) == (2, 0, ())
    cluster.check_shared([("score.output", str(tmp_path / "out"))], [], "", "score.shared_paths")
    monkeypatch.setattr(cluster, "LAUNCHER_CONFIG", str(Path("cluster.yaml").resolve()))
    cap = cluster.capacity()
    assert cap.types == (({"CPU": 8.0, "GPU": 1.0}, 8.0),) and cap.most("GPU") == 8
    assert scoring_job.placement(job().score, cap).device == "cuda"
    with pytest.raises(config.ConfigError, match=r"score.output=.*a Ray cluster whose autoscaler can add nodes "
                                                 r"\(up to 8 x \{CPU 8, GPU 1\}\)"):
        cluster.check_shared([("score.output", str(tmp_path / "out"))], [], "", "score.shared_paths")


@pytest.mark.parametrize("setting, device, images, actors, want", [
    ("auto", "cpu", 1_999, 1, False), ("auto", "cpu", 2_000, 1, True), ("auto", "cpu", 3_000, 2, False),
    ("auto", "cuda", 40_000, 1, False), ("auto", "cuda", 100_000, 2, True), ("true", "cuda", 10, 1, True),
    ("false", "cpu", 10**6, 1, False)])
def test_compile_auto_compiles_where_each_actor_wins_the_compile_back(setting, device, images, actors, want):
    assert use_compile(job(f"score.compile={setting}").score, device, images, actors) is want


def test_model_batch_defaults_to_256_on_gpu_and_16_on_cpu():
    default = config.load(None, [], config.ScoreJob).score
    assert (scoring_job.model_batch(default, "cuda"), scoring_job.model_batch(default, "cpu")) == (256, 16)
    assert scoring_job.model_batch(job().score, "cuda") == 4  # set: taken as it is


def test_actor_calls_default_to_4_on_gpu_and_1_on_cpu():
    default = config.load(None, [], config.ScoreJob).score
    assert (scoring_job.actor_calls(default, "cuda"), scoring_job.actor_calls(default, "cpu")) == (4, 1)
    assert scoring_job.actor_calls(job("score.actor_calls=3").score, "cpu") == 3


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_scorer_actor_on_gpu_matches_cpu(tmp_path, sheets, ckpts, precision):
    """The actor class itself on CUDA (bf16 autocast or bf16 weights, channels_last) against fp32 on
    CPU, same decoded batch."""
    for ckpt in (ckpts["multilabel"], ckpts["segmenter"]):
        plan = make_plan(job(f"score.checkpoint={ckpt}").score, None)
        batch = decoded_batch(sheets, plan)
        cpu = Scorer(plan, ActorSettings())(batch).to_pandas()
        gpu = Scorer(plan, ActorSettings("cuda", precision=precision))(batch).to_pandas()
        assert_rows_agree(gpu, cpu)


@pytest.mark.gpu
def test_a_batch_too_large_for_the_gpu_runs_in_halves(tmp_path, sheets, caplog):
    """A real out-of-memory: resnet50 on full 256x1600 sheets, 8,192 at once (its first layer's
    output alone would be over 100 GB), runs in halves; the rows match a batch of 8."""
    ckpt = make_checkpoint(tmp_path / "r50", "multilabel", "resnet50", size=(256, 1600))
    plan = make_plan(job(f"score.checkpoint={ckpt}").score, None)
    small = decoded_batch(sheets, plan, 8)
    large = {k: np.concatenate([v] * 1024) for k, v in small.items()}
    scorer = Scorer(plan, ActorSettings("cuda"))
    with caplog.at_level(logging.WARNING, logger="steelray"):
        got = scorer(large).to_pandas()
    assert "ran out of GPU memory" in caplog.text and 1 <= scorer.models[plan.primary.uri].fits < 8192
    want = Scorer(plan, ActorSettings("cuda"))(small).to_pandas()
    probs = [c for c in want.columns if c.startswith("prob_")]
    np.testing.assert_allclose(got[probs].to_numpy(float), np.tile(want[probs].to_numpy(float), (1024, 1)), atol=0.02)


def test_an_empty_night_is_a_warning_and_an_empty_summary(tmp_path, ckpts, caplog):
    (tmp_path / "in").mkdir()
    with caplog.at_level(logging.WARNING, logger="steelray"):
        summary = scoring_job.run(job(f"score.input={tmp_path / 'in'}", f"score.checkpoint={ckpts['multilabel']}",
                                f"score.segmenter={ckpts['segmenter']}", f"score.output={tmp_path / 'out'}"))
    assert (summary.inputs, summary.scored, summary.errored, summary.gate_skipped) == (0, 0, 0, 0)
    assert f"{tmp_path / 'in'}: no images to score" in caplog.text
