"""The entry scripts, run as a user runs them."""

import os
import shutil
import subprocess
import sys
import tempfile

import pandas as pd
import pytest


@pytest.fixture
def ray_tmp():
    """A short temp dir for Ray: its Unix socket paths must stay under 107 bytes."""
    path = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_demo_generates_reads_back_and_trains(tmp_path, ray_tmp):
    out = tmp_path / "demo"
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    run = subprocess.run([sys.executable, "jobs/demo.py", "--out", str(out), "--n", "12", "--epochs", "1"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr
    assert "generated 12 synthetic sheets" in run.stdout
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert len(manifest) == 12 and set(manifest.columns) >= {"image_id", "uri", "labels", "rles", "group"}
    for line in ("images", "labels", "manifest", "config"):
        assert f"  {line} " in run.stdout
    assert (out / "config.yaml").exists() and (out / "data" / "train.csv").exists()
    assert "[4/6] trained simple_cnn for 1 epoch(s)" in run.stdout
    assert "[5/6] scored: inputs 13: scored 12, errors 1, skipped (already scored) 0" in run.stdout
    # the corrupt file is 1 of 13 rows: past the report's default 2% error bound
    assert "[6/6] morning report: 1 alert(s)\n      ALERT error rate 7.7% (1 of 13 rows)" in run.stdout
    scores = pd.read_parquet(out / "predictions")
    assert len(scores) == 13 and scores.source_uri.is_unique
    assert "corrupt.jpg" in scores[scores.error.notna()].source_uri.iloc[0]
    assert f"  checkpoint {out / 'runs' / 'demo' / 'epoch-0001'}" in run.stdout
    assert (out / "runs" / "demo" / "epoch-0001" / "model.safetensors").exists()
    assert (out / "predictions" / "_reports").is_dir() and "  report     " in run.stdout


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_train_then_score_on_a_local_head(tmp_path, ray_tmp):
    """`ray start --head` + `ray job submit` as a user runs them, token authentication left on."""
    import signal
    import time
    import urllib.request

    from steelray import synth

    synth.make_neu(str(tmp_path / "neu"), 4, seed=1, workers=1)
    port, dash, dead_port = _free_port(), _free_port(), _free_port()  # dead_port: nothing listens there
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--num-cpus=2", "--disable-usage-stats",
         # own ports for the agents too, so another Ray on the machine cannot block them
         f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
         f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
         f"--temp-dir={ray_tmp}"],
        stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:  # the job API answers (401 without a token counts as up)
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()
                time.sleep(1)
        env = {**os.environ, "RAY_AUTH_MODE": "token"}
        env.pop("RAY_ADDRESS", None)
        runtime_env = '{"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}}'
        submit = ["ray", "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", ".",
                  "--runtime-env-json", runtime_env, "--",
                  "python", "jobs/train.py", "--config", "jobs/configs/neu.yaml", f"data.root={tmp_path / 'neu'}",
                  "model.name=simple_cnn", "input.size=[32,32]", "train.epochs=1", "ray.cpus_per_worker=0.5",
                  "train.loader_workers=0",
                  f"ray.storage_path={tmp_path / 'runs'}", "ray.run_name=job",
                  # an MLflow server that is down: the job stays green and says so
                  f"tracking.uri=http://127.0.0.1:{dead_port}", "tracking.timeout=2"]
        for _ in range(20):  # the head's job agent comes up a little after its HTTP server
            job = subprocess.run(submit, capture_output=True, text=True, timeout=600, env=env)
            if "No available agent to submit job" not in job.stderr:
                break
            time.sleep(3)
        logs = job.stdout + job.stderr
        assert job.returncode == 0, logs[-4000:]
        assert f"best checkpoint: {tmp_path / 'runs' / 'job' / 'epoch-0001'}" in logs
        assert "succeeded" in logs
        assert f"tracking: off (MLflow server http://127.0.0.1:{dead_port} not reachable within 2 s" in logs
        assert logs.count("epoch 1/1 train_loss") == 1, "per-epoch progress missing from the job logs, or doubled"

        # The nightly job the same way, with the checkpoint just trained.
        images = sorted(p for p in (tmp_path / "neu").rglob("*.jpg"))
        score = ["ray", "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", ".",
                 "--runtime-env-json", runtime_env, "--",
                 "python", "jobs/score.py", "--input", str(tmp_path / "neu"), "--checkpoint",
                 str(tmp_path / "runs" / "job" / "epoch-0001"), "--output", str(tmp_path / "scores"),
                 "score.suffixes=[.jpg]", "score.actor_cpus=0.5"]
        job = subprocess.run(score, capture_output=True, text=True, timeout=600, env=env)
        logs = job.stdout + job.stderr
        assert job.returncode == 0, logs[-4000:]
        assert f"inputs {len(images)}: scored {len(images)}, errors 0" in logs
        scores = pd.read_parquet(tmp_path / "scores")
        assert sorted(scores.source_uri) == sorted(map(str, images))
        assert {"prob_crazing", "prob_scratches", "labels", "any_defect", "error"} <= set(scores.columns)

        # What a scheduler sees of the nightly entrypoint (deploy/nightly.sh): Ray keeps its exit code
        nightly = ["ray", "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", ".",
                   "--runtime-env-json", runtime_env, "--submission-id", "nightly-bad", "--",
                   "sh", "deploy/nightly.sh", "--input", str(tmp_path / "incoming" / "{date}"), "--checkpoint",
                   str(tmp_path / "runs" / "job" / "epoch-0001"), "--output", str(tmp_path / "scores")]
        job = subprocess.run(nightly, capture_output=True, text=True, timeout=600, env=env)
        logs = job.stdout + job.stderr
        assert job.returncode != 0 and "unknown placeholder(s) {date}" in logs and "nightly: exit" not in logs, \
            logs[-4000:]  # exit 2: not tried again
        info = subprocess.run([sys.executable, "-c", "from ray.job_submission import JobSubmissionClient as C; "
                               f"print(C('http://127.0.0.1:{dash}').get_job_info('nightly-bad').driver_exit_code)"],
                              capture_output=True, text=True, timeout=120, env=env)
        assert info.stdout.split()[-1:] == ["2"], info.stdout + info.stderr
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops the processes it started
        head.wait(60)
