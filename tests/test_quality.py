"""Inspection quality (issue 25): test-time augmentation and ensembles, in scoring and evaluation.
Tiny plain CNNs; the real NEU images where they matter, synthetic ones where a labelled set is trained on."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from steelray import checkpoint, config, data, ensemble, evaluate, export, models, predict, synth
from steelray.scoring.actor import ActorSettings, Scorer
from steelray.scoring.decode import read_and_decode
from steelray.scoring.plan import ScoreError, make_plan

from test_evaluate import _train_tiny

NEU = "jobs/configs/neu.yaml"


def decoded(plan, uris: list[str]) -> dict:
    """The decode stage's batch of ``uris``, as the scoring job hands it to a model actor."""
    return read_and_decode({"image_id": np.array(uris, dtype=object), "source_uri": np.array(uris, dtype=object)},
                           inputs=[p.to_dict() for p in plan.inputs], expect_size=plan.expect_size, s3=None,
                           retries=0, threads=2)


def scored(model: str, uris: list[str], *overrides: str):
    plan = make_plan(config.load(None, [f"score.checkpoint={model}", *overrides], config.ScoreJob).score, None)
    rows = Scorer(plan, ActorSettings())(decoded(plan, uris)).to_pandas()
    return plan, rows, rows[[c for c in rows.columns if c.startswith("prob_")]].to_numpy(float)


@pytest.fixture(scope="module")
def neu_synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("neu-quality")
    synth.make_neu(str(root / "data"), 8, seed=3, workers=1)
    cfg = config.load(NEU, [f"data.root={root / 'data'}", "model.name=simple_cnn", "input.size=[48,48]",
                            "data.val_fraction=0.5"])
    manifest = data.build_manifest(cfg)
    folders = []
    for seed, steps in ((0, 30), (1, 20)):  # two different tiny models of the same task and classes
        torch.manual_seed(seed)
        model, pre = _train_tiny(cfg, data.split(manifest, cfg.data)[0], steps=steps)
        folder = root / f"m{seed}"
        checkpoint.write(str(folder), model, checkpoint.make_meta(cfg, manifest.classes, pre))
        folders.append(folder)
    return root, cfg, manifest, folders


def test_an_ensemble_of_one_checkpoint_scores_as_that_checkpoint(neu_synth):
    root, _, manifest, (a, _) = neu_synth
    ensemble.write(str(root / "one"), [str(a)])
    uris = manifest.records.uri.tolist()[:12]
    _, want, p_want = scored(str(a), uris)
    plan, got, p_got = scored(str(root / "one"), uris)
    np.testing.assert_allclose(p_got, p_want, atol=1e-6)
    assert got.labels.map(list).tolist() == want.labels.map(list).tolist()
    assert plan.primary.members and plan.model_name.startswith("ensemble of 1 (simple_cnn)")


def test_an_ensemble_averages_its_members_and_its_version_is_its_set_and_tta(neu_synth):
    root, _, manifest, (a, b) = neu_synth
    ensemble.write(str(root / "ab"), [str(a), str(b)])
    ensemble.write(str(root / "ba"), [str(b), str(a)])
    ensemble.write(str(root / "aa"), [str(a)])
    uris = manifest.records.uri.tolist()[:12]
    _, _, pa = scored(str(a), uris)
    _, _, pb = scored(str(b), uris)
    plan, rows, pab = scored(str(root / "ab"), uris)
    np.testing.assert_allclose(pab, (pa + pb) / 2, atol=1e-6)
    assert (rows.labels.map(lambda x: x[0]) == [manifest.classes[i] for i in pab.argmax(1)]).all()
    versions = {name: scored(str(root / name), uris[:1])[0].digest for name in ("ab", "ba", "aa")}
    versions["ab-flips"] = scored(str(root / "ab"), uris[:1], "score.tta=flips")[0].digest
    assert versions["ab"] == versions["ba"]   # a set: the order of its members is no new version
    assert len({versions["ab"], versions["aa"], versions["ab-flips"]}) == 3


def test_an_ensemble_is_calibrated_on_its_averaged_probabilities(neu_synth):
    root, _, _, (a, b) = neu_synth
    ens = root / "calibrated"
    ensemble.write(str(ens), [str(a), str(b)])
    before = make_plan(config.load(None, [f"score.checkpoint={ens}"], config.ScoreJob).score, None).digest
    job = config.load(None, [f"evaluate.checkpoint={ens}", "evaluate.robustness=false",
                             "evaluate.min_recall.crazing=0.99", "evaluate.write_thresholds=true"], config.EvaluateJob)
    ev = evaluate.run(job)
    probs = [predict.predict(predict.load_model(job, str(m)), checkpoint.read_meta(str(m)), ev.manifest, job)
             for m in (a, b)]
    np.testing.assert_allclose(ev.probs, (probs[0] + probs[1]) / 2, atol=1e-6)
    written = evaluate.write_back(ev)
    spec = json.loads(Path(written).read_text())
    assert written.endswith("ensemble.json") and spec["thresholds"] == ev.calibration["thresholds"]
    assert spec["calibration"]["min_recall"] == {"crazing": 0.99} and list(ens.glob("ensemble.before-*.json"))
    after = make_plan(config.load(None, [f"score.checkpoint={ens}"], config.ScoreJob).score, None)
    assert after.digest != before and list(after.primary.thresholds) == spec["thresholds"]


def test_an_ensemble_refuses_members_that_do_not_fit_together(neu_synth, tmp_path):
    root, cfg, manifest, (a, _) = neu_synth
    other = config.load(NEU, [f"data.root={root / 'data'}", "model.name=simple_cnn", "input.size=[64,64]"])
    checkpoint.write(str(tmp_path / "big"), models.build_model(other, 6),
                     checkpoint.make_meta(other, manifest.classes, models.preprocess_for(other)))
    with pytest.raises(ensemble.EnsembleError, match=r"member .*big: input \[64, 64\] x 1 channel\(s\) differs"):
        ensemble.write(str(tmp_path / "e"), [str(a), str(tmp_path / "big")])
    checkpoint.write(str(tmp_path / "five"), models.build_model(cfg, 5),
                     checkpoint.make_meta(cfg, manifest.classes[:5], models.preprocess_for(cfg)))
    with pytest.raises(ensemble.EnsembleError, match="member .*five: classes"):
        ensemble.write(str(tmp_path / "e"), [str(a), str(tmp_path / "five")])
    with pytest.raises(ensemble.EnsembleError, match="member .*nothing: not a steelray checkpoint"):
        ensemble.write(str(tmp_path / "e"), [str(a), str(tmp_path / "nothing")])


def _clipped_copies(uris: list[str], folder: Path) -> list[str]:
    """The images with their left 70% black (0), as an under-exposed sheet with clipped shadows."""
    from PIL import Image

    folder.mkdir(exist_ok=True)
    out = []
    for uri in uris:
        image = np.array(Image.open(uri))
        image[:, : int(image.shape[1] * 0.7)] = 0
        out.append(str(folder / f"clipped-{Path(uri).stem}.png"))
        Image.fromarray(image).save(out[-1])
    return out


def test_a_routed_ensemble_sends_clipped_images_to_its_route_model_alone(neu_synth, tmp_path):
    root, _, manifest, (a, b) = neu_synth
    job = [sys.executable, "jobs/ensemble.py", "--members", str(a), "--route", str(b), "--out", str(tmp_path / "routed")]
    refused = subprocess.run(job, capture_output=True, text=True)
    assert refused.returncode == 2 and "--route and --route-above go together" in refused.stderr
    made = subprocess.run(job + ["--route-above", "0.5"], capture_output=True, text=True)
    assert made.returncode == 0 and f"clipped images (> 0.5 black) to {b}" in made.stdout, made.stderr
    uris = manifest.records.uri.tolist()[:4]
    uris = uris + _clipped_copies(uris[:2], tmp_path / "clipped")   # four as they are, two 70% black
    _, _, pa = scored(str(a), uris)
    _, _, pb = scored(str(b), uris)
    plan, rows, pr = scored(str(tmp_path / "routed"), uris)
    np.testing.assert_allclose(pr[:4], pa[:4], atol=1e-6)         # the members' reading
    np.testing.assert_allclose(pr[4:], pb[4:], atol=1e-6)         # the route's model's
    assert np.abs(pa[4:] - pb[4:]).max() > 1e-3                   # two models that differ there
    assert "clipped > 0.5 to simple_cnn" in plan.model_name
    for only in (uris[:4], uris[4:]):                             # a batch all of one kind
        np.testing.assert_allclose(scored(str(tmp_path / "routed"), only)[2], (pa if only == uris[:4] else pb)[
            [uris.index(u) for u in only]], atol=1e-6)
    # evaluation reads it as scoring does
    records = manifest.records.iloc[:6].copy()
    records["uri"] = uris
    job = config.load(None, [f"evaluate.checkpoint={tmp_path / 'routed'}"], config.EvaluateJob)
    meta = predict.read_meta(str(tmp_path / "routed"))
    got = predict.predict(predict.load_model(job), meta, replace(manifest, records=records), job)
    np.testing.assert_allclose(got, pr, atol=1e-5)
    # the route is part of the version: its model and its share
    ensemble.write(str(tmp_path / "other-share"), [str(a)], route=(str(b), 0.25))
    ensemble.write(str(tmp_path / "other-model"), [str(a)], route=(str(a), 0.5))
    ensemble.write(str(tmp_path / "none"), [str(a)])
    versions = {scored(str(tmp_path / n), uris[:1])[0].digest for n in ("routed", "other-share", "other-model", "none")}
    assert len(versions) == 4
    with pytest.raises(ensemble.EnsembleError, match=r"route: black share 1.5 is not in \[0, 1\)"):
        ensemble.write(str(tmp_path / "bad"), [str(a)], route=(str(b), 1.5))
    with pytest.raises(ensemble.EnsembleError, match="member .*nothing: not a steelray checkpoint"):
        ensemble.write(str(tmp_path / "bad"), [str(a)], route=(str(tmp_path / "nothing"), 0.5))


# --- test-time augmentation ----------------------------------------------------------------------

def _symmetric(model: torch.nn.Module) -> torch.nn.Module:
    """Every 3x3 kernel averaged over the eight symmetries of a square: with zero padding and 2x2
    pooling of even sizes, the plain CNN then sees an image and its flips and turns alike."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                w = m.weight
                views = [w, w.flip(2), w.flip(3), w.flip(2).flip(3)]
                views += [v.transpose(2, 3) for v in views]
                m.weight.copy_(sum(views) / 8)
    return model


@pytest.mark.parametrize("engine", ["torch", pytest.param("onnxruntime", marks=pytest.mark.slow)])
def test_tta_leaves_a_symmetric_model_unchanged_and_moves_one_that_is_not(neu_real, tmp_path, engine):
    """Through the scoring actor, in PyTorch and in ONNX Runtime, on real NEU images."""
    cfg = config.load("jobs/configs/neu.yaml", [f"data.root={neu_real}", "model.name=simple_cnn",
                                                "input.size=[48,48]"])
    uris = [str(p) for p in sorted((neu_real / "images").glob("*.jpg"))[::150]]
    probs, versions = {}, set()
    for kind in ("symmetric", "plain"):
        torch.manual_seed(1)
        model = models.build_model(cfg, 6).eval()
        with torch.no_grad():  # an untrained head gives nearly uniform probabilities: make them move
            model.head[-1].weight.mul_(300)
        model = _symmetric(model) if kind == "symmetric" else model
        folder = tmp_path / kind
        checkpoint.write(str(folder), model, checkpoint.make_meta(cfg, list(data.NEU_CLASSES), models.preprocess_for(cfg)))
        model_uri = folder
        if engine == "onnxruntime":
            export.run(config.load(None, [f"export.checkpoint={folder}", "export.int8=false"], config.ExportJob))
            model_uri = folder / "export" / "model.onnx"
        for tta in ("none", "flips", "dihedral"):
            plan, _, probs[kind, tta] = scored(str(model_uri), uris, f"score.engine={engine}", f"score.tta={tta}")
            versions.add(plan.digest)
    assert len(versions) == 6   # each model, each tta: a version of its own
    for tta in ("flips", "dihedral"):
        np.testing.assert_allclose(probs["symmetric", tta], probs["symmetric", "none"], atol=1e-5)
        assert np.abs(probs["plain", tta] - probs["plain", "none"]).max() > 1e-3
    assert np.abs(probs["plain", "dihedral"] - probs["plain", "flips"]).max() > 1e-3


def test_tta_dihedral_needs_a_square_input_and_a_model_trained_with_turns(neu_synth, tmp_path):
    def plan(model, tta="dihedral"):
        return make_plan(config.load(None, [f"score.checkpoint={model}", f"score.tta={tta}"], config.ScoreJob).score,
                         None)

    cfg = config.load(None, ["task=multilabel", "model.name=simple_cnn", "input.size=[32,64]", "data.format=severstal"])
    checkpoint.write(str(tmp_path / "wide"), models.build_model(cfg, 4),
                     checkpoint.make_meta(cfg, list(data.SEVERSTAL_CLASSES), models.preprocess_for(cfg)))
    with pytest.raises(ScoreError, match="tta dihedral turns images by 90 degrees, which needs a square input"):
        plan(tmp_path / "wide")
    _, square, manifest, (a, _) = neu_synth
    unturned = config.load(NEU, [f"data.root={square.data.root}", "model.name=simple_cnn", "input.size=[48,48]",
                                 "input.turns=false"])
    checkpoint.write(str(tmp_path / "unturned"), models.build_model(unturned, 6),
                     checkpoint.make_meta(unturned, manifest.classes, models.preprocess_for(unturned)))
    ensemble.write(str(tmp_path / "mixed"), [str(a), str(tmp_path / "unturned")])
    for model in (tmp_path / "unturned", tmp_path / "mixed"):
        with pytest.raises(ScoreError, match="trained without turns .input.turns: false.*use flips"):
            plan(model)
        assert plan(model, "flips").primary.tta == "flips"
    for model in ("unturned", "mixed"):  # the mixed ensemble's first member was trained with turns
        job = config.load(None, [f"evaluate.checkpoint={tmp_path / model}", "evaluate.tta=dihedral"], config.EvaluateJob)
        with pytest.raises(evaluate.EvaluationError, match="evaluate.tta: .*trained without turns"):
            evaluate.run(job)
    assert plan(a).primary.tta == "dihedral"  # trained with turns (the default)


def test_evaluation_with_tta_sees_what_scoring_with_tta_sees(neu_synth):
    _, _, _, (a, _) = neu_synth
    job = config.load(None, [f"evaluate.checkpoint={a}", "evaluate.robustness=false", "evaluate.tta=dihedral"],
                      config.EvaluateJob)
    ev = evaluate.run(job)
    _, _, probs = scored(str(a), ev.manifest.records.uri.tolist(), "score.tta=dihedral")
    np.testing.assert_allclose(ev.probs, probs, atol=1e-5)
    assert ev.summary()["tta"] == "dihedral"
