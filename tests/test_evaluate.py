"""Evaluation: metrics against hand-computed cases, threshold calibration, and the report as a user
gets it (jobs/evaluate.py on checkpoints of tiny models, no Ray)."""

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from steelray import checkpoint, conditions, config, data, evaluate, images, metrics, model_io, models, predict, rle, synth
from steelray.scoring.plan import column_name, describe

# --- metrics on cases small enough to compute by hand -----------------------------------------------


def test_multiclass_metrics_by_hand():
    targets = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    probs = np.full((6, 3), 0.1)
    probs[np.arange(6), pred] = 0.8
    m = metrics.classification_detail("multiclass", probs, targets, ["a", "b", "c"], [0.5] * 3)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6) and m["micro_f1"] == pytest.approx(4 / 6)
    per = {r["class"]: r for r in m["per_class"]}
    assert (per["a"]["precision"], per["a"]["recall"], per["a"]["f1"]) == pytest.approx((0.5, 0.5, 0.5))
    assert (per["b"]["precision"], per["b"]["recall"], per["b"]["f1"]) == pytest.approx((2 / 3, 1.0, 0.8))
    assert (per["c"]["precision"], per["c"]["recall"], per["c"]["f1"]) == pytest.approx((1.0, 0.5, 2 / 3))
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert [r["support"] for r in m["per_class"]] == [2, 2, 2]


def test_binary_metrics_by_hand():
    m = metrics.classification_detail("binary", np.array([0.9, 0.4, 0.6, 0.1]), np.array([1, 1, 0, 0]),
                                      ["defect"], [0.5])
    r = m["per_class"][0]
    assert (r["precision"], r["recall"], r["f1"]) == pytest.approx((0.5, 0.5, 0.5))
    assert r["roc_auc"] == pytest.approx(0.75)     # 3 of the 4 positive-negative pairs ranked right
    assert r["pr_auc"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)  # AP: precision 1 at recall .5, 2/3 at 1
    assert m["confusion"] == [[[1, 1], [1, 1]]]
    assert m["accuracy"] == pytest.approx(0.5)


def test_decision_rule_argmax_unless_a_class_threshold_is_reached():
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.15, 0.65]])
    assert metrics.decide("multiclass", probs, [0.5, 0.5, 0.5]).tolist() == [0, 2]
    assert metrics.decide("multiclass", probs, [0.5, 0.2, 0.5]).tolist() == [1, 2]  # 0.3/0.2 beats 0.6/0.5
    assert metrics.decide("multilabel", probs, [0.5, 0.2, 0.5]).tolist() == [[1, 1, 0], [0, 0, 1]]


def test_wrong_images_at_the_models_own_decision_by_hand():
    from types import SimpleNamespace

    def wrong(task, probs, targets, classes, thresholds):
        ev = SimpleNamespace(task=task, probs=np.array(probs), targets=np.array(targets), classes=classes,
                             meta={"thresholds": thresholds},
                             manifest=SimpleNamespace(records=pd.DataFrame({"image_id": ["p", "q"]})))
        return evaluate.Evaluation.wrong_images(ev)

    probs = [[0.6, 0.3, 0.1], [0.2, 0.15, 0.65]]
    assert wrong("multiclass", probs, [0, 2], ["a", "b", "c"], [0.5] * 3) == []
    assert wrong("multiclass", probs, [0, 2], ["a", "b", "c"], [0.5, 0.2, 0.5]) == [  # b's own threshold wins
        {"image_id": "p", "label": "a", "predicted": "b"}]
    assert wrong("multilabel", probs, [[1, 1, 0], [0, 0, 0]], ["1", "2", "3"], [0.5, 0.2, 0.5]) == [
        {"image_id": "q", "label": "none", "predicted": "3"}]
    assert wrong("binary", [0.9, 0.4], [0, 0], ["defect"], [0.5]) == [
        {"image_id": "p", "label": "none", "predicted": "defect"}]


def test_lighting_conditions_by_hand():
    """glare: 0.7x + 76.5 (no clipping); dim: 0.7x; crushed: 0.7x - 76.5 clipped at 0."""
    x = np.array([[0, 50, 100, 150, 200, 255]], np.uint8)[..., None]
    got = {c: conditions.perturb_image(x, c).ravel().astype(int) for c in ("glare", "dim", "crushed")}
    assert np.abs(got["glare"] - (0.7 * x.ravel() + 76.5)).max() <= 1
    assert np.abs(got["dim"] - 0.7 * x.ravel()).max() <= 1
    assert np.abs(got["crushed"] - np.clip(0.7 * x.ravel() - 76.5, 0, 255)).max() <= 1 and got["crushed"][2] == 0
    with pytest.raises(ValueError, match="unknown condition 'fog'"):
        conditions.perturb_image(x, "fog")


def test_mask_metrics_by_hand():
    truth = np.zeros((2, 1, 4, 4), bool)
    truth[0, 0, 0, :] = True                        # image 0: 4 true pixels, image 1: none
    prob = np.zeros((2, 1, 4, 4))
    prob[0, 0, 0, :2] = 0.9                         # 2 right
    prob[0, 0, 1, :2] = 0.7                         # 2 wrong
    parts = [metrics.mask_stats(prob[i], truth[i], np.array([0.5, 0.8])) for i in range(2)]
    stats = {k: np.stack([p[k] for p in parts]) for k in parts[0]}
    stats["candidates"] = np.array([0.5, 0.8])
    dice, iou, found = metrics.pair_scores(stats, [0.5], [0])
    assert dice[:, 0].tolist() == [0.5, 1.0] and iou[0, 0] == pytest.approx(2 / 6)  # empty-empty = 1
    assert metrics.pair_scores(stats, [0.8], [0])[0][0, 0] == pytest.approx(2 * 2 / (2 + 4))
    assert metrics.pair_scores(stats, [0.5], [5])[0][:, 0].tolist() == [0.0, 1.0]    # 4 px < min area 5
    d = metrics.segmentation_detail(stats, ["1"], [0.5], [0])
    assert d["dice"] == pytest.approx(0.75) and d["per_class"][0]["recall"] == 1.0
    assert d["dice"] == pytest.approx(metrics.mean_dice(prob >= 0.5, truth))  # same as training's Dice


# --- calibration ------------------------------------------------------------------------------------

def _synthetic_scores(n=600, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    truth = (rng.random((n, classes)) < 0.3).astype(int)
    probs = np.where(truth == 1, rng.beta(5, 2, truth.shape), rng.beta(2, 5, truth.shape))
    return probs, truth


@pytest.mark.parametrize("target", [0.9, 0.95, 0.99])
def test_min_recall_is_met_at_the_highest_threshold_that_meets_it(target):
    probs, truth = _synthetic_scores()
    cal = evaluate.calibrate_classifier("multilabel", probs, truth, ["a", "b", "c"], {"b": target}, np.full(3, 0.5))
    t = cal["thresholds"][1]
    recall = (probs[truth[:, 1] == 1, 1] >= t).mean()
    assert recall >= target and cal["chosen"][1]["recall"] == pytest.approx(recall)
    higher = np.unique(probs[truth[:, 1] == 1, 1])
    higher = higher[higher > t]
    assert (probs[truth[:, 1] == 1, 1] >= higher.min()).mean() < target  # the next one up misses it
    assert cal["chosen"][1]["policy"] == f"recall >= {target:g}"


def test_f1_thresholds_are_the_best_f1_and_multiclass_min_recall_holds():
    from sklearn.metrics import f1_score

    probs, truth = _synthetic_scores(seed=1)
    cal = evaluate.calibrate_classifier("multilabel", probs, truth, ["a", "b", "c"], {}, np.full(3, 0.5))
    for c in range(3):
        best = max(f1_score(truth[:, c], probs[:, c] >= t) for t in np.unique(probs[:, c]))
        assert f1_score(truth[:, c], probs[:, c] >= cal["thresholds"][c]) == pytest.approx(best)
    # multiclass: lowering one class's threshold under the decision rule meets its recall
    rng = np.random.default_rng(2)
    targets = rng.integers(0, 4, 400)
    logits = rng.normal(0, 1, (400, 4))
    logits[np.arange(400), targets] += 1.0
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert (p.argmax(1)[targets == 2] == 2).mean() < 0.95
    cal = evaluate.calibrate_classifier("multiclass", p, targets, list("wxyz"), {"y": 0.95}, np.full(4, 0.5))
    pred = metrics.decide("multiclass", p, cal["thresholds"])
    assert (pred[targets == 2] == 2).mean() >= 0.95
    assert cal["thresholds"][0] == 0.5 and cal["chosen"][0]["policy"] == "argmax"


# --- the job and its report ------------------------------------------------------------------------

def _train_tiny(cfg, manifest, steps=60):
    """A tiny model trained in-process (no Ray): enough to be right on most images."""
    from torch.utils.data import DataLoader

    from steelray import train, train_data

    torch.manual_seed(0)
    model = models.build_model(cfg, len(manifest.classes))
    pre = models.preprocess_for(cfg)
    ds = train_data.SheetDataset(train_data.records(manifest, cfg.task), cfg.task, pre)
    loader = DataLoader(ds, batch_size=8, shuffle=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_fn = train.make_loss(cfg.task, None)
    step = 0
    while step < steps:
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(model_io.model_input(x, pre)), y).backward()
            opt.step()
            step += 1
    return model.eval(), pre


@pytest.fixture(scope="module")
def neu_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("neu-eval")
    synth.make_neu(str(root / "data"), 10, seed=5, workers=1)
    cfg = config.load("jobs/configs/neu.yaml", [f"data.root={root / 'data'}", "model.name=simple_cnn",
                                                "input.size=[48,48]", "data.val_fraction=0.5"])
    manifest = data.build_manifest(cfg)
    model, pre = _train_tiny(cfg, manifest)
    folder = root / "ckpt"
    # a hand-set threshold from before (crazing 0.3): calibration replaces it
    meta = checkpoint.make_meta(cfg, manifest.classes, pre, epoch=3, thresholds=[0.3] + [0.5] * 5)
    checkpoint.write(str(folder), model, meta)
    return folder


def _images_of(html: str) -> dict[str, bytes]:
    import re

    return {name: base64.b64decode(data) for name, data in
            re.findall(r'<figure id="(\w+)"><img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)}


def _valid_html(path: Path):
    import html5lib

    html5lib.HTMLParser(strict=True).parse(path.read_text())  # raises on any parse error


def test_classifier_report_calibrates_writes_back_and_scoring_uses_it(neu_checkpoint, tmp_path):
    from PIL import Image

    before_meta = json.loads((neu_checkpoint / "meta.json").read_text())
    digest_before = describe(str(neu_checkpoint)).digest
    out = tmp_path / "report"
    run = subprocess.run([sys.executable, "jobs/evaluate.py", "--checkpoint", str(neu_checkpoint), "--out", str(out),
                          "--min-recall", "crazing=0.99", "--write-thresholds"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.rstrip().splitlines()[-1] == f"report: {out / 'report.html'}"
    _valid_html(out / "report.html")
    html = (out / "report.html").read_text()
    images = _images_of(html)
    assert set(images) == {"confusion", "roc", "pr", "thresholds", "gradcam", "mistakes", "robustness"} or \
        set(images) == {"confusion", "roc", "pr", "thresholds", "gradcam", "robustness"}  # no mistakes to show
    for name, png in images.items():
        assert Image.open(io.BytesIO(png)).size[0] > 200, name
        assert (out / f"{name}.png").read_bytes() == png
    m = json.loads((out / "metrics.json").read_text())
    assert m["data"]["split"] == "val" and m["data"]["images"] == 30  # half of 60, as the config split it
    assert set(m["metrics"]) >= {"accuracy", "macro_f1", "micro_f1", "roc_auc_macro", "roc_auc_micro",
                                 "pr_auc_macro", "pr_auc_micro", "per_class", "confusion"}
    assert set(m["robustness"]["conditions"]) == {"glare", "dim", "crushed", "blur", "noise"}
    assert m["robustness"]["bright_dim_gap"] == pytest.approx(
        abs(m["robustness"]["conditions"]["glare"]["macro_f1"] - m["robustness"]["conditions"]["dim"]["macro_f1"]))
    crazing = next(ch for ch in m["calibration"]["chosen"] if ch["class"] == "crazing")
    assert crazing["policy"].startswith("recall >= 0.99")
    assert crazing["threshold"] <= 0.5  # multiclass: above 0.5 a threshold changes nothing
    # The recall asked for, or, where no threshold reaches it (a tiny model: another class's
    # probability can beat crazing's at any crazing threshold), the most any threshold gives.
    job = config.load(None, [f"evaluate.checkpoint={neu_checkpoint}"], config.EvaluateJob)
    model, meta0 = checkpoint.load_model(str(neu_checkpoint))
    cfg = evaluate.labelled_set_config(meta0, job)
    val = evaluate.select(data.build_manifest(cfg), cfg, job)
    probs, truth = predict.predict(model, meta0, val, job), val.targets("multiclass") == 0

    def recall(t: float) -> float:
        return float((metrics.decide("multiclass", probs, [t] + [0.5] * 5)[truth] == 0).mean())

    best = recall(float(probs[truth, 0].min()))
    assert crazing["recall"] == pytest.approx(recall(crazing["threshold"]))
    assert crazing["recall"] >= min(0.99, best) - 1e-9 and crazing["recall"] >= recall(0.5)
    assert "Model card" in html and "known weaknesses" in html
    # written back: scoring reads the new thresholds, under a new model version
    meta = json.loads((neu_checkpoint / "meta.json").read_text())
    assert meta["thresholds"] == m["calibration"]["thresholds"] != before_meta["thresholds"]
    assert json.loads(next(neu_checkpoint.glob("meta.before-*.json")).read_text()) == before_meta
    info = describe(str(neu_checkpoint))
    assert info.thresholds == tuple(meta["thresholds"]) and info.digest != digest_before
    # the probabilities stay with the checkpoint: the night report's drift reference, as scoring names them
    reference = pd.read_parquet(neu_checkpoint / "reference.parquet")
    assert list(reference.columns) == [f"prob_{column_name(c)}" for c in info.classes] and len(reference) == 30
    np.testing.assert_allclose(reference.sum(axis=1), 1, atol=1e-5)  # softmax rows


def test_bad_arguments_exit_2_and_say_what(neu_checkpoint, tmp_path, capsys, load_job):
    main = load_job("evaluate").main  # in this process: each case as a subprocess cost ~5 s of imports
    for args, says in ((["--min-recall", "nope=0.9"], "min recall for nope: not a class"),
                       (["--min-recall", "crazing"], "expected CLASS=R"),
                       (["--split", "all", "data.format=severstal"], "train.csv"),
                       (["train.lr=1"], "train: unknown key; valid keys: evaluate, data, s3")):
        code = main(["--checkpoint", str(neu_checkpoint), "--out", str(tmp_path / "x"), *args])
        err = capsys.readouterr().err
        assert code == 2 and says in err, (args, err[-2000:])
    run = subprocess.run([sys.executable, "jobs/evaluate.py", "--checkpoint", str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=300)  # and once as a user runs it
    assert run.returncode == 2 and "not a steelray checkpoint" in run.stderr


def test_segmenter_report_dice_matches_the_masks_computed_directly(sheets, tmp_path):
    cfg = config.load("jobs/configs/severstal_segmentation.yaml", [
        f"data.root={sheets.root}", "model.name=resnet18", "model.arch=fpn", "input.size=[64,384]",
        "input.crop=[]", "data.limit=8"])
    manifest = data.build_manifest(cfg)
    model, pre = _train_tiny(cfg, manifest, steps=10)
    folder = tmp_path / "seg"
    checkpoint.write(str(folder), model, checkpoint.make_meta(cfg, manifest.classes, pre))
    ev = evaluate.run(config.load(None, [f"evaluate.checkpoint={folder}", "evaluate.split=all", "evaluate.limit=8"],
                                  config.EvaluateJob))
    # Kaggle Dice straight from the model: full-size probabilities, threshold 0.5, no minimum area
    pred, truth = [], []
    for r in manifest.records.itertuples():
        img = images.load_image(r.uri, 1)
        x = model_io.model_input(model_io.to_chw(model_io.resize(img, pre.size))[None], pre)
        with torch.no_grad():
            p = torch.nn.functional.interpolate(torch.sigmoid(model(x)), size=img.shape[:2], mode="bilinear",
                                                align_corners=False)[0].numpy()
        pred.append(p >= 0.5)
        truth.append(np.stack([rle.decode(m, img.shape[:2]) for m in r.rles]).astype(bool))
    assert ev.before["dice"] == pytest.approx(metrics.mean_dice(np.stack(pred), np.stack(truth)))
    assert ev.after["dice"] >= ev.before["dice"] - 1e-9  # calibration never makes the set's Dice worse
    from steelray import report

    written = report.write(ev, str(tmp_path / "seg-report"))
    _valid_html(Path(written["report.html"]))
    assert set(_images_of(Path(written["report.html"]).read_text())) >= {"thresholds", "masks", "robustness"}
    m = json.loads(Path(written["metrics.json"]).read_text())
    assert len(m["calibration"]["min_area"]) == 4 and set(m["metrics"]) >= {"dice", "iou", "detection_macro_f1"}


def test_checkpoint_and_report_on_s3(neu_checkpoint, bucket, s3_endpoint):
    """Checkpoint read from S3, report written to S3, S3 settings in the options (not the env)."""
    import s3fs

    from steelray import report

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    fs.put(str(neu_checkpoint) + "/", f"{bucket}/ckpt/", recursive=True)
    ev = evaluate.run(config.load(None, [f"evaluate.checkpoint={bucket}/ckpt", "evaluate.robustness=false",
                                         f"s3.endpoint_url={s3_endpoint}", "s3.access_key_id=testing",
                                         "s3.secret_access_key=testing", "s3.region=us-east-1"], config.EvaluateJob))
    written = report.write(ev, f"{bucket}/report")
    assert written["report.html"] == f"{bucket}/report/report.html"
    html = fs.cat(f"{bucket}/report/report.html").decode()
    assert set(_images_of(html)) >= {"confusion", "roc", "pr", "thresholds", "gradcam"} and "Robustness" not in html
    assert json.loads(fs.cat(f"{bucket}/report/metrics.json"))["data"]["images"] == len(ev.manifest)
