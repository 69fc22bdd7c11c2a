"""The morning report. Input drift on nights the scoring job really scored (synthetic sheets, one
night with glare on most of them); probability drift, the review list and the candidate comparison
on nights whose rows are written here with known probabilities, as the scoring job's sink writes them."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from steelray import checkpoint, conditions, config, data, drift, images, input_stats, models, night_report, storage, synth
from steelray.scoring import job as scoring_job
from steelray.scoring.output import ParquetSink
from steelray.scoring.plan import ModelInfo, Plan, classify, column_name

CLASSES = data.SEVERSTAL_CLASSES


def report_job(out: str, *overrides: str) -> config.NightReportJob:
    return config.load(None, [f"report.output={out}", *overrides], config.NightReportJob)


def test_drift_flags_a_shift_worth_acting_on_and_not_noise():
    rng = np.random.default_rng(0)
    ref, same = rng.normal(0.5, 0.1, 2000), rng.normal(0.5, 0.1, 2000)
    assert not drift.compare(same, ref, 0.2, 0.001)["flagged"]
    moved = drift.compare(rng.normal(0.6, 0.1, 2000), ref, 0.2, 0.001)
    assert moved["flagged"] and moved["ks"] > 0.3 and moved["median"] > moved["reference_median"]
    # a tiny shift on many sheets is significant but not worth an alert; a few sheets are never tested
    assert not drift.compare(rng.normal(0.51, 0.1, 20000), ref, 0.2, 0.001)["flagged"]
    few = drift.compare([0.9] * 5, ref, 0.2, 0.001)
    assert few["ks"] is None and not few["flagged"]


# --- nights the scoring job scored ---------------------------------------------------------------

@pytest.fixture(scope="module")
def nights(ray_local, tmp_path_factory):
    """Three nights of 40 different synthetic sheets scored by an untrained model; on the third, 32
    sheets carry glare (evaluate's "glare" condition: stray light, contrast -30%) and one file is truncated."""
    root = tmp_path_factory.mktemp("nights")
    cfg = config.load(None, ["task=multilabel", "model.name=resnet10t", "input.size=[64,320]", "data.format=severstal"])
    torch.manual_seed(0)
    ckpt = str(root / "ckpt")
    checkpoint.write(ckpt, models.build_model(cfg, 4), checkpoint.make_meta(cfg, CLASSES, models.preprocess_for(cfg)))
    out = str(root / "out")
    for k, night in enumerate(["2026-11-20", "2026-11-21", "2026-11-22"]):
        written = synth.make_severstal(str(root / night), 40, seed=100 + k, workers=1)
        if k == 2:
            for name in sorted(os.listdir(written.images))[:32]:
                path = os.path.join(written.images, name)
                image = images.decode_image(Path(path).read_bytes(), 1)
                Path(path).write_bytes(synth.jpeg_bytes(conditions.perturb_image(image, "glare")[:, :, 0]))
            Path(written.images, "zz-truncated.jpg").write_bytes(Path(path).read_bytes()[:3000])
        scoring_job.run(config.load(None, [f"score.input={written.images}", f"score.checkpoint={ckpt}",
                                           f"score.output={out}", f"score.run_date={night}", "score.batch_size=8",
                                           "score.decode_batch=8"], config.ScoreJob))
    return out, ckpt


def test_a_glare_night_is_flagged_on_input_drift_and_a_clean_night_is_not(nights, load_job, tmp_path, capsys):
    out, _ = nights
    clean = night_report.build(report_job(out, "report.night=2026-11-21"))
    assert clean.summary["alerts"] == [], clean.summary["alerts"]
    assert set(clean.summary["drift"]["inputs"]) == set(input_stats.STATS)
    assert not any(d["flagged"] for d in clean.summary["drift"]["inputs"].values())

    main = load_job("night_report").main
    assert main(["--output", out, "--out", str(tmp_path / "report")]) == 4  # the newest night: glare
    printed = capsys.readouterr().out
    assert "ALERT input_contrast: sheets drifted" in printed
    s = json.loads((tmp_path / "report" / "report.json").read_text())
    assert s["night"] == "2026-11-22" and s["nights_before"] == ["2026-11-20", "2026-11-21"]
    washed_out = s["drift"]["inputs"]["input_contrast"]
    assert washed_out["flagged"] and washed_out["median"] < washed_out["reference_median"]
    v = s["volumes"]
    assert (v["rows"], v["scored"], v["errors"], v["error_kinds"]) == (41, 40, 1, {"corrupt or truncated": 1})
    assert v["jobs"] == 1 and v["skipped"] == 0 and v["inputs_listed"] == 41
    assert any("error rate 2.4%" in a for a in s["alerts"])  # 1 of 41 is past the default 2%

    html = (tmp_path / "report" / "report.html").read_text()
    import html5lib

    html5lib.HTMLParser(strict=True).parse(html)  # raises on any parse error
    pngs = [base64.b64decode(b) for b in __import__("re").findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]
    assert len(pngs) >= 3 and all(p.startswith(b"\x89PNG") for p in pngs)
    review = (tmp_path / "report" / "review.csv").read_text().splitlines()
    assert review[0].startswith("image,image_id,class,probability,threshold,margin") and len(review) == 41


def test_an_output_scored_before_the_input_statistics_reports_without_input_drift(nights, tmp_path):
    import shutil

    import pyarrow.parquet as pq

    out = str(tmp_path / "old")
    shutil.copytree(nights[0], out)
    for f in Path(out).glob("run_date=*/part-*.parquet"):
        pq.write_table(pq.read_table(f).drop_columns(list(input_stats.STATS)), f)
    s = night_report.build(report_job(out)).summary
    assert s["drift"]["inputs"] == {} and "no input drift" in s["drift"]["inputs_note"]
    assert s["volumes"]["scored"] == 40 and set(s["drift"]["classes"]) == set(CLASSES)


# --- nights written with known probabilities ------------------------------------------------------

def info(digest: str, task: str = "multilabel", thresholds=(0.5, 0.5, 0.5, 0.5)) -> ModelInfo:
    return ModelInfo(uri="", task=task, classes=tuple(CLASSES), thresholds=tuple(thresholds), preprocess=None,
                     name="resnet18", digest=digest, data_format="severstal")


def write_night(root: str, night: str, model: ModelInfo, probs: np.ndarray, ids: list[str]) -> None:
    """Rows as the scoring job writes them: the plan's schema, labels from the model's decision."""
    schema = Plan(model, None, None, ()).schema()
    decided = [classify(model, p) for p in probs]
    cols = {"image_id": ids, "source_uri": [f"s3://plant/{night}/{i}" for i in ids], "model": [model.name] * len(ids),
            "checkpoint": [model.digest] * len(ids), "scored_at": [None] * len(ids),
            "height": [256] * len(ids), "width": [1600] * len(ids),
            "labels": [d[0] for d in decided], "any_defect": [d[1] for d in decided], "error": [None] * len(ids)}
    for k, c in enumerate(model.classes):
        cols[f"prob_{column_name(c)}"] = probs[:, k].astype(np.float32)
    for name in input_stats.STATS:
        cols[name] = np.full(len(ids), 0.5, np.float32)
    table = pa.Table.from_pydict({f.name: cols[f.name] for f in schema}, schema=schema)
    ParquetSink(storage.join(root, f"run_date={night}"), None, 10**6, 0).write([table], None)


def test_one_classs_probabilities_shifting_flags_that_class_only(tmp_path):
    out, rng, v = str(tmp_path / "out"), np.random.default_rng(1), info("aaaa000011112222")
    for k, night in enumerate(["2026-11-20", "2026-11-21", "2026-11-22"]):
        probs = rng.beta(2, 8, size=(300, 4))
        if k == 2:
            probs[:, 2] = np.clip(probs[:, 2] + 0.25, 0, 1)  # class 3 reads higher tonight
        write_night(out, night, v, probs, [f"{night}-{i:04d}.jpg" for i in range(300)])
    s = night_report.build(report_job(out)).summary
    assert s["drift"]["reference"] == "nights before"
    assert [c for c, d in s["drift"]["classes"].items() if d["flagged"]] == ["3"]
    assert len(s["alerts"]) == 1 and s["alerts"][0].startswith("class 3: probabilities drifted")


def test_the_review_list_holds_the_sheets_nearest_the_threshold(tmp_path):
    out, rng = str(tmp_path / "out"), np.random.default_rng(2)
    v = info("bbbb000011112222", thresholds=(0.5, 0.3, 0.6, 0.5))
    probs = np.where(rng.random((200, 4)) < 0.5, rng.uniform(0.0, 0.05, (200, 4)), rng.uniform(0.95, 1.0, (200, 4)))
    near = {7: (1, 0.3 + 0.004), 50: (2, 0.6 - 0.001), 99: (0, 0.5 + 0.002), 150: (3, 0.5 - 0.003)}
    for i, (c, p) in near.items():
        probs[i, c] = p
    ids = [f"s{i:03d}.jpg" for i in range(200)]
    write_night(out, "2026-11-22", v, probs, ids)
    s = night_report.build(report_job(out, "report.review=4")).summary
    assert [(r["image_id"], r["class"]) for r in s["review"]] == [
        ("s050.jpg", "3"), ("s099.jpg", "1"), ("s150.jpg", "4"), ("s007.jpg", "2")]
    assert s["review"][0]["threshold"] == 0.6 and s["review"][0]["image"] == "s3://plant/2026-11-22/s050.jpg"


def test_a_candidate_is_reported_with_exactly_the_sheets_it_flips(tmp_path):
    out, rng = str(tmp_path / "out"), np.random.default_rng(3)
    prod, cand = info("cccc000011112222"), info("dddd000011112222")
    ids = [f"s{i:03d}.jpg" for i in range(120)]
    probs = np.where(rng.random((120, 4)) < 0.3, 0.9, 0.1)
    theirs = probs.copy()
    gained, lost = [3, 40, 77], [12, 90]  # class 2: the candidate finds 3 more scratches and drops 2
    probs[gained, 1], theirs[gained, 1] = 0.1, 0.8
    probs[lost, 1], theirs[lost, 1] = 0.9, 0.2
    write_night(out, "2026-11-22", prod, probs, ids)
    write_night(out, "2026-11-22", cand, theirs, ids)
    s = night_report.build(report_job(out, f"report.version={prod.digest}", f"report.candidate={cand.digest}")).summary
    c = s["candidate"]
    assert c["sheets"] == 120 and c["only_production"] == c["only_candidate"] == 0
    assert c["classes"]["2"]["gained"] == [ids[i] for i in gained] and c["classes"]["2"]["lost"] == [ids[i] for i in lost]
    assert c["classes"]["2"]["agreement"] == pytest.approx(1 - 5 / 120)
    assert all(c["classes"][k]["gained"] == c["classes"][k]["lost"] == [] for k in ("1", "3", "4"))
    assert sorted(d["image_id"] for d in c["disagreements"]) == sorted(ids[i] for i in gained + lost)


def test_a_night_or_version_that_is_not_there_is_named(tmp_path):
    out = str(tmp_path / "out")
    write_night(out, "2026-11-22", info("eeee000011112222"), np.full((3, 4), 0.2), ["a.jpg", "b.jpg", "c.jpg"])
    with pytest.raises(night_report.ReportError, match="report.night 2026-11-23: .* nights there: 2026-11-22"):
        night_report.build(report_job(out, "report.night=2026-11-23"))
    with pytest.raises(night_report.ReportError, match="version ffff has no files"):
        night_report.build(report_job(out, "report.version=ffff"))
    with pytest.raises(night_report.ReportError, match="no scoring output there"):
        night_report.build(report_job(str(tmp_path / "nothing")))


def test_probabilities_are_judged_against_the_checkpoints_validation_set_where_it_kept_one(tmp_path):
    """jobs/evaluate.py keeps the validation probabilities in the checkpoint (test_evaluate checks the
    file); with --checkpoint the report takes them as the reference. Here the nights agree with each
    other but all read class 1 higher than validation did: flagged against validation, not against
    the nights before."""
    from steelray.scoring.plan import describe

    cfg = config.load(None, ["task=multilabel", "model.name=simple_cnn", "input.size=[64,320]", "data.format=severstal"])
    ckpt = str(tmp_path / "ckpt")
    checkpoint.write(ckpt, models.build_model(cfg, 4), checkpoint.make_meta(cfg, CLASSES, models.preprocess_for(cfg)))
    v = describe(ckpt)
    rng = np.random.default_rng(4)
    pa_probs = rng.beta(2, 8, size=(400, 4)).astype(np.float32)
    import pyarrow.parquet as pq

    pq.write_table(pa.table({f"prob_{column_name(c)}": pa_probs[:, k] for k, c in enumerate(CLASSES)}),
                   os.path.join(ckpt, checkpoint.REFERENCE))
    out = str(tmp_path / "out")
    for night in ("2026-11-21", "2026-11-22"):
        probs = rng.beta(2, 8, size=(300, 4))
        probs[:, 0] = np.clip(probs[:, 0] + 0.3, 0, 1)
        write_night(out, night, info(v.digest, thresholds=v.thresholds), probs, [f"{night}-{i}.jpg" for i in range(300)])
    against_validation = night_report.build(report_job(out, f"report.checkpoint={ckpt}")).summary["drift"]
    assert against_validation["reference"] == "validation"
    assert [c for c, d in against_validation["classes"].items() if d["flagged"]] == ["1"]
    against_nights = night_report.build(report_job(out, f"report.checkpoint={ckpt}", "report.reference=nights"))
    assert against_nights.summary["drift"]["reference"] == "nights before"
    assert not any(d["flagged"] for d in against_nights.summary["drift"]["classes"].values())
    with pytest.raises(night_report.ReportError, match="has no validation probabilities"):
        night_report.build(report_job(out, f"report.version={v.digest}", "report.reference=validation"))


def test_a_segmenters_night_reports_defect_area_and_outlines_its_masks_in_the_gallery(tmp_path):
    """Segmenter rows (rle_/area_ columns) of 30 sheets on disk: a scratch field on every third sheet,
    class 3's peak probability rising with its area. The report's mean area per class is the rows'
    own, the gallery is class 3's largest, and the page draws their masks (the sheets can be read)."""
    from steelray import rle

    model = info("ffff000011112222", task="segmentation", thresholds=(0.5,) * 4)
    schema = Plan(model, None, None, ()).schema()
    sheet = synth.jpeg_bytes(np.full((256, 1600), 120, np.uint8))
    ids, areas = [f"s{i:02d}.jpg" for i in range(30)], np.zeros((30, 4), np.int64)
    cols = {c: [] for c in schema.names}
    for i, name in enumerate(ids):
        storage.write_bytes(str(tmp_path / "in" / name), sheet)
        mask = np.zeros((256, 1600), bool)
        if i % 3 == 0:
            mask[100:100 + 10 + i, 200:600] = True
            areas[i, 2] = mask.sum()
        for k, c in enumerate(model.classes):
            cols[f"rle_{column_name(c)}"].append(rle.encode(mask) if k == 2 else "")
            cols[f"area_{column_name(c)}"].append(int(areas[i, k]))
            cols[f"prob_{column_name(c)}"].append(0.5 + areas[i, k] / 40000 if k == 2 and areas[i, k] else 0.1)
        cols["labels"].append(["3"] if areas[i, 2] else [])
        cols["any_defect"].append(bool(areas[i, 2]))
        for name_, value in (("image_id", name), ("source_uri", str(tmp_path / "in" / name)), ("model", "unet"),
                             ("checkpoint", model.digest), ("scored_at", None), ("height", 256), ("width", 1600),
                             ("error", None)):
            cols[name_].append(value)
        for stat in input_stats.STATS:
            cols[stat].append(0.5)
    ParquetSink(str(tmp_path / "out" / "run_date=2026-11-22"), None, 10**6, 0).write(
        [pa.Table.from_pydict(cols, schema=schema)], None)
    job = report_job(str(tmp_path / "out"), "report.gallery=3", f"report.out={tmp_path / 'report'}")
    night = night_report.build(job)
    tonight = night.summary["defects"]["tonight"]
    assert tonight["mean_area"] == pytest.approx({c: float(areas[:, k].mean()) for k, c in enumerate(CLASSES)})
    assert tonight["share"]["3"] == pytest.approx(10 / 30)
    assert [p["image_id"] for p in night.summary["gallery"]["3"]] == ["s27.jpg", "s24.jpg", "s21.jpg"]
    assert set(night.masks) == {str(tmp_path / "in" / n) for n in ("s27.jpg", "s24.jpg", "s21.jpg")}
    from steelray import night_page

    html = Path(night_page.write(night, job)["report.html"]).read_text()
    thumbs = __import__("re").findall(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(thumbs) == 3 and "image no longer readable" not in html
    import cv2

    first = cv2.imdecode(np.frombuffer(base64.b64decode(thumbs[0]), np.uint8), cv2.IMREAD_COLOR)
    assert (first[:, :, 0].astype(int) - first[:, :, 1] > 30).any()  # class 3 outlined in blue (BGR) over grey


def test_an_output_on_s3_reports_into_its_own_reports_folder(bucket):
    """moto's S3: the nights, the job summaries and the report all under the output's prefix."""
    from steelray import night_page

    out, rng, v = f"{bucket}/predictions", np.random.default_rng(5), info("abcd000011112222")
    for night in ("2026-11-21", "2026-11-22"):
        write_night(out, night, v, rng.beta(2, 8, size=(40, 4)), [f"{night}-{i}.jpg" for i in range(40)])
    storage.write_text(f"{out}/_runs/2026-11-23T020000.000000Z-{v.digest}.json", json.dumps(
        {"checkpoint": v.digest, "output": f"{out}/run_date=2026-11-22", "inputs": 41, "skipped": 1}))
    job = report_job(out)
    night = night_report.build(job)
    assert night.summary["night"] == "2026-11-22" and night.summary["volumes"]["scored"] == 40
    assert (night.summary["volumes"]["jobs"], night.summary["volumes"]["skipped"]) == (1, 1)
    written = night_page.write(night, job)
    assert written["report.html"] == f"{out}/_reports/2026-11-22-{v.digest}/report.html"
    assert json.loads(storage.read_text(written["report.json"]))["version"]["digest"] == v.digest
    assert storage.read_text(written["review.csv"]).startswith("image,image_id,class")
