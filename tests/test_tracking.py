"""Experiment tracking and the model registry against real MLflow servers on 127.0.0.1 (conftest.py:
one with a local artifact folder, one with its artifacts on moto's S3), with a real local Ray.
The sweep's parent and child runs are checked in test_tune.py's ASHA sweep."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from steelray import config, registry, synth, tracking, train
from steelray.scoring.plan import describe

NEU = "jobs/configs/neu.yaml"
SMALL = ["model.name=simple_cnn", "input.size=[48,48]", "input.augment=none", "train.loader_workers=0",
         "train.warmup_epochs=0", "train.batch_size=8", "ray.num_workers=1", "train.epochs=2"]


def _client(url: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=url, registry_uri=url)


def _dead_url() -> str:
    with socket.socket() as s:  # a port nothing listens on once this closes
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def neu_tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("neu-tracking")
    synth.make_neu(str(root), 5, seed=11, workers=1)
    return root


@pytest.fixture(scope="module")
def tracked(ray_local, mlflow_server, neu_tiny, tmp_path_factory):
    """One small NEU run trained with tracking on: (config, TrainResult)."""
    runs = tmp_path_factory.mktemp("tracked-runs")
    cfg = config.load(NEU, [f"data.root={neu_tiny}", *SMALL, f"ray.storage_path={runs}", "ray.run_name=tracked",
                            f"tracking.uri={mlflow_server}", "tracking.experiment=steelray-tests"])
    return cfg, train.fit(cfg)


def test_training_logs_config_every_epoch_and_the_best_checkpoint_and_evaluation_joins_its_run(
        tracked, mlflow_server, tmp_path, load_job, capsys):
    cfg, result = tracked
    meta = json.loads((Path(result.best_checkpoint) / "meta.json").read_text())
    run_id = meta["mlflow_run_id"]  # the checkpoint names the run that trained it
    assert result.tracking == f"tracking: MLflow run {run_id} at {mlflow_server}"
    c = _client(mlflow_server)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.runName"] == "tracked"
    assert c.get_experiment(run.info.experiment_id).name == "steelray-tests"
    p = run.data.params
    assert (p["train.lr"], p["model.name"], p["input.size"]) == (str(cfg.train.lr), "simple_cnn", "[48, 48]")
    assert int(p["data.train_images"]) + int(p["data.val_images"]) == 30
    # every epoch's figures, from rank 0, as metrics.csv has them
    history = pd.read_csv(Path(result.run_uri) / "metrics.csv")
    for name in ("macro_f1", "val_loss", "train_loss"):
        logged = sorted((m.step, m.value) for m in c.get_metric_history(run_id, name))
        assert [step for step, _ in logged] == history.epoch.tolist()
        assert [value for _, value in logged] == pytest.approx(history[name].tolist())
    assert run.data.metrics["best_macro_f1"] == pytest.approx(result.best_metrics["macro_f1"])
    assert run.data.tags["steelray.checkpoint"] == result.best_checkpoint
    names = {a.path for a in c.list_artifacts(run_id)} | {a.path for a in c.list_artifacts(run_id, "checkpoint")}
    assert {"model_card.md", "best_checkpoint.txt", "config.yaml", "metrics.csv", "checkpoint/meta.json"} <= names
    card = Path(c.download_artifacts(run_id, "model_card.md", str(tmp_path))).read_text()
    assert result.best_checkpoint in card and "simple_cnn" in card and "flatter" in card

    # the evaluation of that checkpoint goes into the same run
    out = tmp_path / "report"
    assert load_job("evaluate").main(["--checkpoint", result.best_checkpoint, "--out", str(out), "--no-robustness",
                                      f"tracking.uri={mlflow_server}"]) == 0
    assert f"tracking: MLflow run {run_id}" in capsys.readouterr().out
    logged = {a.path for a in c.list_artifacts(run_id, "evaluation/val")}
    assert logged == {f"evaluation/val/{n}" for n in ("metrics.json", "report.html", "thresholds.json")}
    figures = json.loads((out / "metrics.json").read_text())
    assert c.get_run(run_id).data.metrics["eval_val_macro_f1"] == pytest.approx(figures["metrics"]["macro_f1"])
    thresholds = json.loads(Path(c.download_artifacts(run_id, "evaluation/val/thresholds.json", str(tmp_path)))
                            .read_text())
    assert thresholds["thresholds"] == figures["calibration"]["thresholds"]


def test_register_score_by_alias_move_the_alias_and_the_next_night_is_the_new_version(
        tracked, mlflow_server, neu_tiny, tmp_path, load_job, capsys):
    cfg, result = tracked
    ckpt = result.best_checkpoint
    url = f"tracking.uri={mlflow_server}"
    register = load_job("register").main
    assert register(["--checkpoint", ckpt, "--name", "neu-night", "--alias", "production", url]) == 0
    assert "neu-night version 1 (new)" in capsys.readouterr().out
    assert register(["--checkpoint", ckpt, "--name", "neu-night", url]) == 0  # the same files: the same version
    assert "version 1 (already registered)" in capsys.readouterr().out
    c = _client(mlflow_server)
    v1 = c.get_model_version("neu-night", "1")
    meta = json.loads((Path(ckpt) / "meta.json").read_text())
    assert v1.run_id == meta["mlflow_run_id"] and v1.source.startswith(f"runs:/{v1.run_id}/registered/")
    assert v1.tags["steelray.checkpoint"] == ckpt and v1.tags["steelray.sha256"] == registry.digest(ckpt)

    # a recalibrated copy (other thresholds: another model version for scoring) as version 2
    recal = tmp_path / "recalibrated"
    shutil.copytree(ckpt, recal)
    meta["thresholds"] = [0.3] * len(meta["thresholds"])
    (recal / "meta.json").write_text(json.dumps(meta))
    assert register(["--checkpoint", str(recal), "--name", "neu-night", "--alias", "candidate", url]) == 0
    out = tmp_path / "scores"
    score = load_job("score").main
    argv = ["--input", str(neu_tiny / "images"), "--checkpoint", "models:/neu-night@production", "--output", str(out),
            url, "score.actors=1", "score.compile=false"]
    assert score([*argv, "score.run_date=2026-12-01"]) == 0
    assert register(["--name", "neu-night", "--version", "2", "--alias", "production", url]) == 0
    assert c.get_registered_model("neu-night").aliases == {"production": "2", "candidate": "2"}
    assert score([*argv, "score.run_date=2026-12-02"]) == 0
    rows = pq.read_table(out).to_pandas()
    per_night = rows.groupby(rows.run_date.astype(str)).checkpoint.agg(set)
    assert per_night["2026-12-01"] == {describe(ckpt).digest}
    assert per_night["2026-12-02"] == {describe(str(recal)).digest} != per_night["2026-12-01"]
    assert rows.groupby(rows.run_date.astype(str)).size().tolist() == [30, 30]

    # evaluation and export take the alias too: what they read is version 2's folder
    assert load_job("evaluate").main(["--checkpoint", "models:/neu-night@production", "--out", str(tmp_path / "ev"),
                                      "--no-robustness", url]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["checkpoint"] == str(recal)
    assert load_job("export").main(["--checkpoint", "models:/neu-night/1", "--out", str(tmp_path / "onnx"),
                                    "--no-int8", url]) == 0
    assert json.loads((tmp_path / "onnx" / "export.json").read_text())["checkpoint"] == ckpt
    capsys.readouterr()

    # what does not exist is named, with what does
    assert score([*argv, "--checkpoint", "models:/neu-night@staging"]) == 2
    err = capsys.readouterr().err
    assert "models:/neu-night@staging: not there (versions [1, 2]; aliases candidate: 2, production: 2)" in err
    assert register(["--name", "neu-night", "--version", "2", "--alias", "v2", url]) == 2


def test_registry_with_artifacts_on_s3_serves_its_copy_once_the_folder_is_gone_or_changed(
        tracked, mlflow_server_s3, s3_endpoint, tmp_path):
    import s3fs

    from steelray import checkpoint

    _, result = tracked
    folder = tmp_path / "ckpt"
    shutil.copytree(result.best_checkpoint, folder)
    job = config.from_dict({"register": {"checkpoint": str(folder), "name": "neu-s3", "aliases": ["production"]},
                            "tracking": {"uri": mlflow_server_s3, "cache": str(tmp_path / "cache")}},
                           registry.RegisterJob)
    reg = registry.register(job)  # the training run is on the other server: a registration run of its own
    stored = s3fs.S3FileSystem(endpoint_url=s3_endpoint).find("mlflow-artifacts/store")
    assert {Path(k).name for k in stored if "/registered/" in k} == {"model.safetensors", "meta.json"}
    assert registry.resolve("models:/neu-s3@production", job.tracking) == str(folder)  # its own folder, untouched
    digest = describe(str(folder)).digest
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "thresholds": [0.9] * len(meta["thresholds"])}))
    copy = registry.resolve(f"models:/neu-s3/{reg.version}", job.tracking)  # changed: the registry's copy
    assert copy == str(tmp_path / "cache" / "neu-s3" / "1") and describe(copy).digest == digest
    shutil.rmtree(folder)
    assert registry.resolve("models:/neu-s3@production", job.tracking) == copy
    model, meta = checkpoint.load_model(copy)
    assert meta["task"] == "multiclass"
    with pytest.raises(registry.RegistryError, match="no registered model of that name"):
        registry.resolve("models:/nope@production", job.tracking)


def test_a_models_uri_whose_server_is_down_is_retry_later_not_a_bad_argument(tmp_path, load_job, capsys):
    """(Training with a server that is down: test_jobs.py's `ray job submit` run, green with the warning.)"""
    dead = _dead_url()
    code = load_job("score").main(["--input", str(tmp_path), "--checkpoint", "models:/neu@production",
                                   "--output", str(tmp_path / "o"), f"tracking.uri={dead}", "tracking.timeout=2"])
    assert code == 3 and f"MLflow server {dead} not reachable within 2 s" in capsys.readouterr().err


def test_a_failing_call_turns_tracking_off_with_one_warning_and_raises_nothing(mlflow_server, caplog):
    run = tracking.start(tracking.TrackingConfig(uri=mlflow_server), "steelray-tests", "r",
                         key=("steelray.run_uri", "/x/failing"))
    assert run.active
    run.run_id = "0" * 32  # a run the server does not have: every call now fails on the server
    run.log_metrics({"a": 1.0}, step=1)
    run.log_text("x", "x.txt")
    assert not run.active and "logging metrics failed" in run.warning
    assert sum("tracking off" in r.message for r in caplog.records) == 1
    assert "the job went on without it" in run.summary()


def test_a_local_folder_is_a_store_and_a_resumed_run_is_the_same_run(tmp_path):
    cfg = tracking.TrackingConfig(uri=str(tmp_path / "mlruns"))
    first = tracking.start(cfg, "steelray-tests", "a", key=("steelray.run_uri", "/runs/a"))
    first.log_metrics({"macro_f1": 0.5}, step=1)
    first.end()
    again = tracking.start(cfg, "steelray-tests", "a", key=("steelray.run_uri", "/runs/a"))
    other = tracking.start(cfg, "steelray-tests", "b", key=("steelray.run_uri", "/runs/b"))
    assert again.run_id == first.run_id != other.run_id
    again.log_metrics({"macro_f1": 0.7}, step=2)
    c = _client(tracking.store_uri(cfg.uri))
    assert [m.value for m in sorted(c.get_metric_history(first.run_id, "macro_f1"), key=lambda m: m.step)] == [0.5, 0.7]
    assert c.get_run(first.run_id).info.status == "RUNNING"  # resumed: running again until it ends
