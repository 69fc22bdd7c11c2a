"""One home for what an image goes through: the evaluation path (``evaluate.sheet_probabilities``,
then ``model_io.masks``) and the scoring path (the decode stage, then the model actor) give the same
probabilities and masks for the same sheets, so the report's figures are those of the nightly job."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from steelray import checkpoint, config, data, model_io, models, predict, rle
from steelray.scoring.actor import ActorSettings, Scorer
from steelray.scoring.decode import read_and_decode
from steelray.scoring.plan import make_plan

CLASSES = data.SEVERSTAL_CLASSES


def _checkpoint(folder, task: str, name: str, **meta) -> str:
    cfg = config.load(None, [f"task={task}", f"model.name={name}", "input.size=[64,320]", "data.format=severstal"])
    torch.manual_seed(1)
    model = models.build_model(cfg, len(CLASSES))
    checkpoint.write(str(folder), model, {**checkpoint.make_meta(cfg, CLASSES, models.preprocess_for(cfg)), **meta})
    return str(folder)


@pytest.mark.parametrize("task, name, meta", [
    ("multilabel", "resnet10t", {"thresholds": [0.4, 0.5, 0.55, 0.6]}),
    ("segmentation", "resnet18", {"thresholds": [0.95, 0.6, 0.5, 0.2], "min_area": [0, 50, 400, 0]})])
def test_the_evaluation_path_and_the_scoring_path_agree(tmp_path, sheets, task, name, meta):
    ckpt = _checkpoint(tmp_path / "ckpt", task, name, **meta)
    manifest = data.build_manifest(config.load(None, ["data.format=severstal", f"data.root={sheets.root}",
                                                      "data.limit=6"]))
    uris = np.array(list(manifest.records.uri), dtype=object)

    plan = make_plan(config.load(None, [f"score.checkpoint={ckpt}"], config.ScoreJob).score, None)
    decoded = read_and_decode({"image_id": uris, "source_uri": uris}, inputs=[p.to_dict() for p in plan.inputs],
                              expect_size=plan.expect_size, s3=None, retries=0, threads=2)
    scored = Scorer(plan, ActorSettings())(decoded).to_pandas()
    assert scored.error.isna().all()

    model, ckpt_meta = checkpoint.load_model(ckpt)
    job = config.load(None, ["evaluate.batch_size=4"], config.EvaluateJob)  # other batches than scoring's 16
    found_masks = 0
    for i, h, w, probs in predict.sheet_probabilities(model, ckpt_meta, manifest, job):
        row = scored.iloc[i]
        if task != "segmentation":
            np.testing.assert_allclose(row[[f"prob_{c}" for c in CLASSES]].to_numpy(float), probs.numpy(), atol=1e-5)
            continue
        np.testing.assert_allclose(row[[f"prob_{c}" for c in CLASSES]].to_numpy(float),
                                   probs.flatten(1).amax(1).numpy(), atol=1e-5)
        masks = model_io.masks(probs, h, w, meta["thresholds"], meta["min_area"])
        for c, mask in zip(CLASSES, masks):
            assert rle.decode(row[f"rle_{c}"], (h, w)).astype(bool).tolist() == mask.tolist(), (row.image_id, c)
            assert row[f"area_{c}"] == mask.sum()
            found_masks += int(mask.any())
    if task == "segmentation":
        assert found_masks >= 3, "the test needs masks to compare"
