"""Training on a local Ray with 2 gloo CPU workers: tiny models, small inputs, a few synthetic images."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from steelray import checkpoint, config, synth, train


@pytest.fixture(scope="module")
def neu_small(tmp_path_factory):
    root = tmp_path_factory.mktemp("neu-small")
    synth.make_neu(str(root), 8, seed=2, workers=1)
    return root


def run(cfg_path, tmp_path, *overrides):
    cfg = config.load(cfg_path, [f"ray.storage_path={tmp_path / 'runs'}", "ray.run_name=t", "ray.num_workers=2",
                                 "ray.use_gpu=false", "train.warmup_epochs=0",
                                 "train.loader_workers=0", *overrides])  # tiny data, 2 cores: decode in place
    return train.fit(cfg)


def losses(result):
    return pd.read_csv(f"{result.run_uri}/metrics.csv")["train_loss"].tolist()


def assert_trained(result, tmp_path):
    history = losses(result)
    assert len(history) == 4 and result.epochs == 4
    assert np.mean(history[-2:]) < history[0], history
    assert result.best_checkpoint.startswith(str(tmp_path / "runs" / "t" / "epoch-"))
    assert {"macro_f1", "accuracy", "roc_auc", "val_loss"} <= set(result.best_metrics)


@pytest.mark.parametrize("cfg_path, overrides", [
    ("jobs/configs/severstal_multilabel.yaml", ["model.name=mobilenetv3_small_050", "input.size=[64,400]",
                                                "input.crop=[]", "input.augment=light"]),
    ("jobs/configs/severstal_binary.yaml", ["model.name=simple_cnn", "input.size=[64,400]", "input.augment=none",
                                            "train.batch_size=4", "train.lr=1e-3"]),
])
def test_classifier_tasks_train_and_loss_goes_down(ray_local, tmp_path, sheets, cfg_path, overrides):
    result = run(cfg_path, tmp_path, f"data.root={sheets.root}", "train.epochs=4", "train.batch_size=8",
                 "train.lr=2e-3", "train.scheduler=none", *overrides)
    assert_trained(result, tmp_path)


def test_segmentation_trains_with_crops(ray_local, tmp_path, sheets):
    result = run("jobs/configs/severstal_segmentation.yaml", tmp_path, f"data.root={sheets.root}",
                 "model.name=resnet18", "model.arch=fpn", "input.size=[128,800]", "input.crop=[128,256]",
                 "train.epochs=2", "train.batch_size=4", "train.lr=1e-3", "train.scheduler=none")
    history = losses(result)
    assert history[-1] < history[0], history
    assert 0.0 <= result.best_metrics["dice"] <= 1.0


def test_multiclass_trains_and_its_checkpoint_loads_into_a_plain_module_without_ray(ray_local, tmp_path, neu_small):
    result = run("jobs/configs/neu.yaml", tmp_path, f"data.root={neu_small}", "model.name=simple_cnn",
                 "input.size=[48,48]", "input.augment=none", "train.epochs=4", "train.batch_size=8", "train.lr=2e-3",
                 "train.scheduler=none")
    assert_trained(result, tmp_path)
    code = (
        "import sys, torch; from steelray import checkpoint\n"
        f"model, meta = checkpoint.load_model({result.best_checkpoint!r})\n"
        "assert 'ray' not in sys.modules, 'loading a checkpoint imported ray'\n"
        "assert type(model).__name__ == 'SimpleCNN' and not model.training\n"
        "print(meta['task'], meta['classes'], meta['preprocess']['size'], meta['thresholds'][0])\n"
        "print(model(torch.zeros(1, 1, 48, 48)).shape)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "multiclass ['crazing', 'inclusion', 'patches', 'pitted_surface', 'rolled-in_scale', 'scratches'] [48, 48] 0.5" in out.stdout
    assert "torch.Size([1, 6])" in out.stdout
    # the weights are the trained ones, not a fresh init
    model, _ = checkpoint.load_model(result.best_checkpoint)
    fresh = train.models.build_model(config.from_dict(_["config"]), 6)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_the_same_seed_trains_the_same_model(ray_local, tmp_path, neu_small):
    """train.seed fixes weights, sampling and augmentations on both workers: a rerun gives the same
    weights bit for bit (on the same machine); another seed, other weights."""
    def weights(seed, name):
        result = run("jobs/configs/neu.yaml", tmp_path, f"data.root={neu_small}", "model.name=simple_cnn",
                     "input.size=[48,48]", "input.augment=robust", "train.epochs=2", "train.batch_size=8",
                     f"train.seed={seed}", f"ray.run_name={name}")
        model, _ = checkpoint.load_model(result.best_checkpoint)
        return model.state_dict()

    first, again, other = weights(0, "s0"), weights(0, "s0-again"), weights(1, "s1")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_bad_config_fails_before_ray_starts(tmp_path):
    out = subprocess.run([sys.executable, "jobs/train.py", "--config", "jobs/configs/neu.yaml", "train.lr=fast"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "train.lr: expected float, got 'fast'" in out.stderr
    assert "Ray instance" not in out.stdout + out.stderr
    out = subprocess.run([sys.executable, "jobs/train.py", "--config", "jobs/configs/neu.yaml", "train.metric=dice"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "train.metric: 'dice' is not reported for multiclass" in out.stderr


def test_killed_worker_is_restarted_and_resumes_from_the_last_checkpoint(ray_local, tmp_path, neu_small):
    import os
    import signal
    import threading
    import time

    from ray.util.state import list_actors

    outcome = {}

    def fit():
        try:
            outcome["result"] = run("jobs/configs/neu.yaml", tmp_path, f"data.root={neu_small}", "model.name=simple_cnn",
                                    "input.size=[160,160]", "train.epochs=6", "train.batch_size=4", "ray.max_failures=1")
        except BaseException as e:  # surfaced below
            outcome["error"] = e

    thread = threading.Thread(target=fit)
    thread.start()
    # epoch 2's folder exists only after epoch 1's report (a barrier) registered its checkpoint
    second = tmp_path / "runs" / "t" / "epoch-0002"
    deadline = time.monotonic() + 300
    while not second.exists() and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert second.exists(), outcome
    # this session's cluster by address: another Ray on the machine (a job beside the tests) would
    # otherwise make the state API refuse to guess ("Found multiple active Ray instances")
    workers = list_actors(address=ray_local.get_runtime_context().gcs_address,
                          filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert len(workers) == 2
    os.kill(workers[1]["pid"], signal.SIGKILL)
    thread.join(600)
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    rows = pd.read_csv(f"{result.run_uri}/metrics.csv")
    assert rows["epoch"].tolist() == [1, 2, 3, 4, 5, 6] and result.epochs == 6
    assert rows["resumed_from_epoch"].iloc[-1] >= 1, "the restarted workers started over instead of resuming"


def test_data_and_checkpoints_on_s3_and_the_same_run_name_resumes_from_there(ray_local, tmp_path, bucket,
                                                                            s3_endpoint):
    """Images read from S3 by the workers; metrics and checkpoints written to S3; the best checkpoint
    loads back from its s3:// URI; run again with the same run name and more epochs, training goes on
    from the last checkpoint there. S3 settings travel in the config, not the workers' environment."""
    import s3fs

    synth.make_neu(f"{bucket}/neu", 4, seed=3, workers=1)
    s3 = [f"s3.endpoint_url={s3_endpoint}", "s3.access_key_id=testing", "s3.secret_access_key=testing",
          "s3.region=us-east-1"]
    common = [f"data.root={bucket}/neu", "model.name=simple_cnn", "input.size=[32,32]", "train.loader_workers=0",
              f"ray.storage_path={bucket}/runs", "ray.run_name=s3run", *s3]
    result = train.fit(config.load("jobs/configs/neu.yaml", [*common, "train.epochs=2"]))
    assert result.run_uri == f"{bucket}/runs/s3run"
    assert result.best_checkpoint.startswith(f"{bucket}/runs/s3run/epoch-000")
    fs = s3fs.S3FileSystem()
    assert "testing" not in fs.cat(f"{bucket}/runs/s3run/config.yaml").decode()   # secrets masked
    assert len(pd.read_csv(fs.open(f"{bucket}/runs/s3run/metrics.csv"))) == 2
    cfg = config.load("jobs/configs/neu.yaml", [*common, "train.epochs=4", "ray.num_workers=1"])
    model, meta = checkpoint.load_model(result.best_checkpoint, cfg.s3)
    assert meta["epoch"] in (1, 2) and model(torch.zeros(1, 1, 32, 32)).shape == (1, 6)

    again = train.fit(cfg)  # one worker now: the checkpoint does not depend on how many trained it
    fs.invalidate_cache()
    rows = pd.read_csv(fs.open(f"{again.run_uri}/metrics.csv"))
    assert rows["epoch"].tolist() == [1, 2, 3, 4] and rows["resumed_from_epoch"].tolist() == [0, 0, 2, 2]
    assert again.best_checkpoint.startswith(f"{bucket}/runs/s3run/epoch-000")
