"""Export to the line (jobs/export.py): an ONNX model checked against PyTorch on real images, the INT8
accuracy gate, ``score.engine=onnxruntime`` in the nightly job, evaluation of an exported model, and
the line-side scorer in a process that cannot import torch or Ray. A tiny classifier trained here
on the real NEU images, an untrained tiny segmenter on the real Severstal sample."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from steelray import checkpoint, config, data, evaluate, export, model_io, models, onnx_model
from steelray.scoring import job as scoring_job
from steelray.scoring.actor import ActorSettings, Scorer
from steelray.scoring.decode import read_and_decode
from steelray.scoring.plan import ScoreError, make_plan

from test_evaluate import _train_tiny

REPO = Path(__file__).resolve().parents[1]


def export_cmd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/export.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def neu_ckpt(tmp_path_factory, neu_real):
    """A small CNN trained in-process on half the real NEU images (48x48), the other half its validation split."""
    cfg = config.load("jobs/configs/neu.yaml", [f"data.root={neu_real}", "model.name=simple_cnn",
                                                "input.size=[48,48]", "data.val_fraction=0.5"])
    manifest = data.build_manifest(cfg)
    torch.manual_seed(0)
    model, pre = _train_tiny(cfg, data.split(manifest, cfg.data)[0], steps=1000)
    folder = tmp_path_factory.mktemp("neu-export") / "ckpt"
    checkpoint.write(str(folder), model, checkpoint.make_meta(cfg, manifest.classes, pre, epoch=1))
    return folder


@pytest.fixture(scope="module")
def exported(neu_ckpt):
    """jobs/export.py as a user runs it: model.onnx and model.int8.onnx beside the checkpoint."""
    run = export_cmd("--checkpoint", str(neu_ckpt))
    assert run.returncode == 0, run.stderr[-3000:]
    return neu_ckpt / "export", run


def test_export_writes_a_model_within_parity_and_an_int8_model_that_passed_its_gate(neu_ckpt, exported):
    out, run = exported
    figures = json.loads((out / "export.json").read_text())
    parity = figures["fp32"]["parity"]
    assert parity["images"] == 32 and 0 <= parity["max_abs_diff"] <= parity["tolerance"] == 1e-4
    gate = figures["int8"]
    assert gate["metric"] == "macro_f1" and gate["images"] == 600 and gate["calibration"]["images"] == 128
    assert gate["drop"] == pytest.approx(gate["pytorch"] - gate["int8"]) and gate["drop"] <= 0.005
    # a model that has learned: a near-coin model's INT8 flips many near-ties, and whether the gate
    # passes it then depends on the CPU the test runs on
    assert gate["pytorch"] > 0.9, "the tiny model should have learned, or the gate proves little"
    assert f"INT8 gate: macro_f1 {gate['int8']:.4f} against PyTorch's {gate['pytorch']:.4f}" in run.stdout
    meta = json.loads((neu_ckpt / "meta.json").read_text())
    for name, precision in (("model.onnx", "fp32"), ("model.int8.onnx", "int8")):
        blob = (out / name).read_bytes()
        carried = onnx_model.OnnxModel(blob, name).meta
        assert carried["export"]["precision"] == precision and carried["export"]["checkpoint"] == str(neu_ckpt)
        assert {k: carried[k] for k in ("task", "classes", "thresholds", "preprocess")} == \
            {k: meta[k] for k in ("task", "classes", "thresholds", "preprocess")}
        assert hashlib.sha256(blob).hexdigest()[:16] == figures[precision]["digest"]
    assert (out / "model.int8.onnx").stat().st_size < (out / "model.onnx").stat().st_size / 2

    # The gate's figures are jobs/evaluate.py's: the checkpoint's, and the INT8 model's evaluated as a model.
    job = config.load(None, [f"evaluate.checkpoint={neu_ckpt}", "evaluate.robustness=false"],
                      config.EvaluateJob)
    assert evaluate.run(job).before["macro_f1"] == pytest.approx(gate["pytorch"], abs=1e-12)
    report = out / "int8-report"
    run = subprocess.run([sys.executable, "jobs/evaluate.py", "--checkpoint", str(out / "model.int8.onnx"),
                          "--out", str(report), "--no-robustness"], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    m = json.loads((report / "metrics.json").read_text())
    assert m["metrics"]["macro_f1"] == pytest.approx(gate["int8"], abs=1e-12)
    assert m["exported"]["precision"] == "int8" and "gradcam.png" not in m["images"]
    assert "exported: ONNX int8</h1>" in (report / "report.html").read_text()
    assert not (out / checkpoint.REFERENCE).exists()  # a checkpoint's drift reference is not an export's


def decoded(plan, uris: list[str], ids: list[str] | None = None) -> dict:
    """The decode stage's batch of ``uris``, as the scoring job hands it to a model actor."""
    return read_and_decode({"image_id": np.array(ids or uris, dtype=object), "source_uri": np.array(uris, dtype=object)},
                           inputs=[p.to_dict() for p in plan.inputs], expect_size=plan.expect_size, s3=None,
                           retries=0, threads=2)


def export_job(*overrides: str) -> config.ExportJob:
    return config.load(None, list(overrides), config.ExportJob)


@pytest.mark.parametrize("normalize", model_io.NORMALIZATIONS)
def test_each_normalisation_is_in_the_exported_graph(normalize):
    """Each ``input.normalize`` traces into the exported graph and ONNX Runtime computes it as PyTorch
    does, on sheets of different lighting."""
    pre = model_io.Preprocess((32, 32), None, 1, (0.45,), (0.22,), normalize)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3))
    meta = {"preprocess": pre.to_dict(), "task": "multiclass", "model": {"name": "tiny"}}
    exported = onnx_model.OnnxModel(export.to_onnx(model, meta))
    rng = np.random.default_rng(0)
    batch = np.stack([(rng.integers(0, 120, (32, 32, 1)) + offset).astype(np.uint8) for offset in (0, 60, 130)])
    graph = export.Graph(model.eval(), pre, "multiclass")
    assert export.parity(graph, exported, batch) < 1e-4
    with torch.inference_mode():
        probs = graph(torch.from_numpy(batch)).numpy()
    assert np.ptp(probs, axis=0).max() > 1e-3  # the sheets are told apart: not a constant output


def test_parity_past_the_tolerance_refuses_the_export_and_writes_no_model(neu_ckpt, tmp_path):
    with pytest.raises(export.ExportError, match="export refused: the ONNX model's probabilities differ from "
                                                 "PyTorch's by up to .* on 32 validation images"):
        export.run(export_job(f"export.checkpoint={neu_ckpt}", f"export.out={tmp_path}", "export.int8=false",
                              "export.tolerance=0"))
    assert not (tmp_path / "model.onnx").exists()
    assert json.loads((tmp_path / "export.json").read_text())["fp32"]["parity"]["max_abs_diff"] > 0


def test_an_int8_model_past_a_tight_gate_is_refused_with_its_figures(neu_ckpt, exported, tmp_path):
    # Ranges from two images leave most others' activations clipped: INT8 loses accuracy, and a
    # gate allowing no drop refuses it. An earlier export's INT8 model in the folder goes with it.
    (tmp_path / "model.int8.onnx").write_bytes((exported[0] / "model.int8.onnx").read_bytes())
    result = export.run(export_job(f"export.checkpoint={neu_ckpt}", f"export.out={tmp_path}",
                                   "export.calibration_images=2", "export.max_drop=0"))
    gate = json.loads((tmp_path / "export.json").read_text())["int8"]
    assert result.refused and gate["refused"] and gate["drop"] > gate["max_drop"] == 0
    assert gate["drop"] == pytest.approx(gate["pytorch"] - gate["int8"]) and "uri" not in gate
    assert (tmp_path / "model.onnx").exists() and not (tmp_path / "model.int8.onnx").exists()


def test_a_checkpoint_on_s3_exports_to_s3_and_scores_from_there(neu_ckpt, neu_real, bucket):
    from steelray import storage

    for f in neu_ckpt.iterdir():
        if f.is_file():
            storage.write_bytes(f"{bucket}/ckpt/{f.name}", f.read_bytes())
    result = export.run(export_job(f"export.checkpoint={bucket}/ckpt", "export.int8=false"))
    assert result.fp32["uri"] == f"{bucket}/ckpt/export/model.onnx"
    figures = json.loads(storage.read_text(f"{bucket}/ckpt/export/export.json"))
    assert figures["fp32"]["parity"]["max_abs_diff"] <= 1e-4
    plan = make_plan(config.load(None, [f"score.checkpoint={result.fp32['uri']}", "score.engine=onnxruntime"],
                                 config.ScoreJob).score, None)
    assert plan.digest == figures["fp32"]["digest"]
    uris = _neu_sample(neu_real, 4)
    rows = Scorer(plan, ActorSettings())(decoded(plan, uris)).to_pandas()
    assert rows.error.isna().all() and set(rows.checkpoint) == {figures["fp32"]["digest"]}


def _neu_sample(neu_real: Path, n: int = 36) -> list[str]:
    return [str(p) for p in sorted((neu_real / "images").glob("*.jpg"))[::1200 // n]]


def test_nightly_job_with_onnxruntime_labels_as_pytorch_does(ray_local, neu_real, neu_ckpt, exported, tmp_path):
    out, _ = exported
    uris = _neu_sample(neu_real)
    listing = tmp_path / "night.txt"
    listing.write_text("\n".join(uris) + "\n")
    frames = {}
    for engine, model in (("torch", neu_ckpt), ("onnxruntime", out / "model.onnx"),
                          ("onnxruntime", out / "model.int8.onnx")):
        summary = scoring_job.run(config.load(None, [
            f"score.input={listing}", f"score.checkpoint={model}", f"score.engine={engine}",
            f"score.output={tmp_path / 'out'}", "score.run_date=2026-11-28", "score.decode_batch=8",
            "score.batch_size=8"], config.ScoreJob))
        assert (summary.scored, summary.errored) == (len(uris), 0)
        frames[str(model)] = summary.checkpoint
    df = pd.read_parquet(tmp_path / "out")
    figures = json.loads((out / "export.json").read_text())
    assert frames[str(out / "model.onnx")] == figures["fp32"]["digest"]     # the version is the file's digest
    assert frames[str(out / "model.int8.onnx")] == figures["int8"]["digest"]
    by = {k: df[df.checkpoint == v].set_index("source_uri").loc[uris] for k, v in frames.items()}
    eager, fp32, int8 = by.values()
    assert list(fp32.labels.map(list)) == list(eager.labels.map(list))
    probs = [c for c in df.columns if c.startswith("prob_")]
    np.testing.assert_allclose(fp32[probs].to_numpy(float), eager[probs].to_numpy(float), atol=1e-4)
    assert (int8.labels.map(list) == eager.labels.map(list)).mean() >= 0.9
    assert set(fp32.model) == {"simple_cnn onnx-fp32"} and set(int8.model) == {"simple_cnn onnx-int8"}


def test_an_exported_model_needs_the_onnxruntime_engine_and_the_engine_an_exported_model(neu_ckpt, exported):
    out, _ = exported
    with pytest.raises(ScoreError, match="an exported ONNX model; score it with score.engine=onnxruntime"):
        make_plan(config.load(None, [f"score.checkpoint={out / 'model.onnx'}"], config.ScoreJob).score, None)
    with pytest.raises(ScoreError, match="export the checkpoint with jobs/export.py"):
        make_plan(config.load(None, [f"score.checkpoint={neu_ckpt}", "score.engine=onnxruntime"],
                              config.ScoreJob).score, None)
    not_ours = out.parent / "plain.onnx"
    not_ours.write_bytes(b"not a model")
    with pytest.raises(ScoreError, match="not an ONNX model ONNX Runtime can load"):
        make_plan(config.load(None, [f"score.checkpoint={not_ours}", "score.engine=onnxruntime"],
                              config.ScoreJob).score, None)


BLOCK = "import sys; sys.modules['torch'] = None; sys.modules['ray'] = None; "


def test_line_scorer_runs_without_torch_and_gives_the_scoring_jobs_row(neu_real, exported, tmp_path):
    out, _ = exported
    model = str(out / "model.int8.onnx")
    blocked = subprocess.run([sys.executable, "-c", BLOCK + "import torch"], capture_output=True, text=True)
    assert blocked.returncode == 1 and "ModuleNotFoundError" in blocked.stderr  # the block holds
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(Path(_neu_sample(neu_real)[0]).read_bytes()[:300])
    uris = _neu_sample(neu_real, 6) + [str(broken)]
    code = BLOCK + "from steelray.line import main; sys.exit(main(sys.argv[1:]))"
    run = subprocess.run([sys.executable, "-c", code, model, *uris], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 1, run.stderr[-3000:]   # one image could not be scored
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    plan = make_plan(config.load(None, [f"score.checkpoint={model}", "score.engine=onnxruntime"],
                                 config.ScoreJob).score, None)
    want = Scorer(plan, ActorSettings())(decoded(plan, uris, [Path(u).name for u in uris])).to_pylist()
    assert [list(r) for r in rows] == [list(w) for w in want]   # the same columns, in the same order
    for got, row in zip(rows, want):
        for k, v in row.items():
            if k == "scored_at":
                continue
            assert got[k] == (pytest.approx(v, abs=1e-6) if isinstance(v, float) else v), k
    assert rows[-1]["error"].startswith(f"{broken}: unreadable or truncated image")


@pytest.mark.slow  # a U-Net exported, quantised and evaluated twice
def test_a_segmenter_exports_within_parity_and_scores_its_masks_as_pytorch(severstal_real, tmp_path):
    """An untrained U-Net on the real Severstal sample: parity, the INT8 gate on Dice, and the masks."""
    cfg = config.load(None, ["task=segmentation", "model.name=resnet18", "model.arch=unet", "data.format=severstal",
                             f"data.root={severstal_real}", "input.size=[64,416]", "data.val_fraction=0.5"])
    torch.manual_seed(0)
    model = models.build_model(cfg, 4)
    ckpt = tmp_path / "seg"
    checkpoint.write(str(ckpt), model, checkpoint.make_meta(cfg, list(data.SEVERSTAL_CLASSES),
                                                            models.preprocess_for(cfg), thresholds=[0.5] * 4))
    run = export_cmd("--checkpoint", str(ckpt), "export.calibration_images=4", "export.max_drop=1")
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads((ckpt / "export" / "export.json").read_text())
    assert figures["fp32"]["parity"]["max_abs_diff"] <= 1e-4 and figures["int8"]["metric"] == "dice"
    uris = sorted(str(p) for p in (severstal_real / "train_images").glob("*.jpg"))
    rows = {}
    for engine, path in (("torch", ckpt), ("onnxruntime", ckpt / "export" / "model.onnx")):
        plan = make_plan(config.load(None, [f"score.checkpoint={path}", f"score.engine={engine}"],
                                     config.ScoreJob).score, None)
        rows[engine] = Scorer(plan, ActorSettings())(decoded(plan, uris)).to_pandas()
    eager, exported = rows["torch"], rows["onnxruntime"]
    for c in ("1", "2", "3", "4"):  # masks at the sheet's size: torch's bilinear on tensors, OpenCV's on arrays
        np.testing.assert_allclose(exported[f"area_{c}"], eager[f"area_{c}"], rtol=1e-3, atol=5)
        np.testing.assert_allclose(exported[f"prob_{c}"], eager[f"prob_{c}"], atol=1e-4)
