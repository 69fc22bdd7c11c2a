"""Jobs on a Ray cluster of several nodes, played on this machine by Ray's own ``Cluster`` (several
raylets, each a node with its own resources). Each scenario runs in a subprocess: the tests' own
local Ray stays as it is."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from steelray import checkpoint, config, data, models, storage

REPO = Path(__file__).resolve().parents[1]

def result(stdout: str) -> dict:
    """The scenario's RESULT line (Ray's own lines may come after it)."""
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[len("RESULT "):])


def scenario(script: str, tmp_path: Path, sheets, n: int, model: str, size: tuple[int, int], ray_tmp: str) -> dict:
    """``n`` synthetic sheets (copies past 24) under ``tmp_path/in`` and an untrained ``model`` checkpoint at
    ``tmp_path/ckpt``; then ``script`` (argv: the folder, the checkpoint) in a fresh process on a
    Ray of its own; returns its RESULT."""
    names = sorted(os.listdir(sheets.images))
    for k in range(n):  # past the fixture's sheets, copies under new names
        name = names[k % len(names)]
        storage.write_bytes(str(tmp_path / "in" / (f"{k // len(names)}-{name}" if k >= len(names) else name)),
                            storage.read_bytes(os.path.join(sheets.images, name)))
    cfg = config.load(None, ["task=multilabel", f"model.name={model}", f"input.size=[{size[0]},{size[1]}]",
                             "data.format=severstal"])
    checkpoint.write(str(tmp_path / "ckpt"), models.build_model(cfg, 4),
                     checkpoint.make_meta(cfg, data.SEVERSTAL_CLASSES, models.preprocess_for(cfg)))
    return run_script(script, [str(tmp_path), str(tmp_path / "ckpt")], ray_tmp)


def on_s3(script: str, bucket: str, endpoint: str, ray_tmp: str) -> dict:
    """A small NEU set under ``bucket``/neu on moto's S3; then ``script`` (argv: the bucket, the
    endpoint) as ``scenario`` runs it."""
    from steelray import synth

    synth.make_neu(f"{bucket}/neu", 12, seed=3, workers=1)
    return run_script(script, [bucket, endpoint], ray_tmp)


def run_script(script: str, args: list[str], ray_tmp: str) -> dict:
    """``script`` in a fresh process with a Ray temp dir of its own; its RESULT."""
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, capture_output=True, text=True,
                         timeout=1200, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    return result(run.stdout)


@pytest.fixture
def ray_tmp():
    """A short temp dir for the cluster's Ray: its Unix socket paths must stay under 107 bytes."""
    path = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


TWO_NODES = """
import json, sys
import ray
from ray.cluster_utils import Cluster
from steelray import config, train
from steelray.scoring import job

root, ckpt = sys.argv[1:]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
cluster.add_node(num_cpus=1)
ray.init(address=cluster.address)
said = {}
score = ["score.run_date=2026-11-28", "score.batch_size=4", "score.decode_batch=4", "score.actor_cpus=0.5",
         f"score.input={root}/in", f"score.checkpoint={ckpt}", f"score.output={root}/out"]
try:
    job.run(config.load(None, score, config.ScoreJob))
except config.ConfigError as e:
    said["score"] = str(e)
try:
    train.fit(config.load(None, ["task=multilabel", "model.name=simple_cnn", "input.size=[64,320]",
                                 f"data.root={root}/train", f"ray.storage_path={root}/runs"]))
except config.ConfigError as e:
    said["train"] = str(e)
summary = job.run(config.load(None, score + [f"score.shared_paths=[{root}]"], config.ScoreJob))
said["declared"] = [summary.scored, summary.errored]
said["nodes"] = len([n for n in ray.nodes() if n["Alive"]])
print("RESULT", json.dumps(said), flush=True)
ray.shutdown()
cluster.shutdown()
"""


def test_local_paths_are_refused_on_two_nodes_unless_declared_shared(tmp_path, sheets, ray_tmp):
    """On two nodes a local output (or input, or training data and storage) would land on whichever
    node wrote it: refused before any work, naming the settings and the fix; declared as a shared
    folder (here both nodes do see it), the night is scored."""
    said = scenario(TWO_NODES, tmp_path, sheets, 3, "resnet10t", (64, 320), ray_tmp)
    assert said["nodes"] == 2
    assert f"score.output={tmp_path / 'out'}" in said["score"] and "score.input=" in said["score"], said
    assert "(and 2 more)" in said["score"] and "score.shared_paths=[/mnt/shared]" in said["score"]
    assert "a local path on a Ray cluster of 2 nodes" in said["score"]
    assert f"data.root={tmp_path / 'train'}" in said["train"] and "ray.storage_path=" in said["train"], said
    assert "ray.shared_paths=" in said["train"] and not (tmp_path / "runs").exists()  # before any work
    assert said["declared"] == [3, 0]


NODE_LOST = """
import json, os, sys, threading, time
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors
from steelray import config
from steelray.scoring import job

root, ckpt = sys.argv[1:]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the head runs no work
workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
ray.init(address=cluster.address)
cfg = config.load(None, [f"score.input={root}/in", f"score.checkpoint={ckpt}", f"score.output={root}/out",
                         f"score.shared_paths=[{root}]", "score.run_date=2026-11-28", "score.batch_size=2",
                         "score.decode_batch=2", "score.rows_per_file=2", "score.actor_cpus=0.5"], config.ScoreJob)
result = {}
scoring = threading.Thread(target=lambda: result.update(summary=job.run(cfg)))
scoring.start()
part = os.path.join(root, "out", "run_date=2026-11-28")
deadline = time.monotonic() + 300
while not (os.path.isdir(part) and any(f.startswith("part-") for f in os.listdir(part))):
    assert time.monotonic() < deadline and scoring.is_alive(), "no output file within 300 s"
    time.sleep(0.05)
actor = next(a for a in list_actors(address=cluster.address, filters=[("state", "=", "ALIVE")]) if "Scorer" in a.class_name)
lost = next(w for w in workers if w.node_id == actor.node_id)
written = len(os.listdir(part))
cluster.remove_node(lost)
scoring.join(600)
s = result["summary"]
print("RESULT", json.dumps({"inputs": s.inputs, "scored": s.scored, "errored": s.errored, "written_at_loss": written,
                            "restarts": s.actor_restarts, "lines": s.lines()}), flush=True)
ray.shutdown()
cluster.shutdown()
"""


def test_the_node_of_the_model_actor_lost_mid_job_leaves_an_exact_output(tmp_path, sheets, ray_tmp):
    """A spot reclaim: the node hosting the model actor goes after the first Parquet file. Ray Data
    starts the actor again on the other node and redoes the unfinished batches; the same run ends
    with every sheet exactly once (its own read-back checks that) and no unfinished file visible."""
    import pandas as pd

    # A full-size resnet18 (~0.3 s a sheet here), so that the job is still running at the loss.
    said = scenario(NODE_LOST, tmp_path, sheets, 16, "resnet18", (256, 1600), ray_tmp)
    assert (said["inputs"], said["scored"], said["errored"]) == (16, 16, 0), said
    assert said["written_at_loss"] < 8, "the job was nearly done at the loss: make it slower"
    assert said["restarts"] >= 1 and any("restarted" in line for line in said["lines"]), said
    df = pd.read_parquet(tmp_path / "out")
    assert len(df) == 16 and df.source_uri.is_unique and df.error.isna().all()
    part = tmp_path / "out" / "run_date=2026-11-28"
    assert not [f for f in os.listdir(part) if f.startswith(".")]


POOL_GROWS = """
import json, os, sys, threading, time
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors
from steelray import cluster as steel_cluster, config
from steelray.scoring import job

root, ckpt = sys.argv[1:]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
cluster.add_node(num_cpus=2)
ray.init(address=cluster.address)
cfg = config.load(None, [f"score.input={root}/in", f"score.checkpoint={ckpt}", f"score.output={root}/out",
                         f"score.shared_paths=[{root}]", "score.run_date=2026-11-28", "score.batch_size=2",
                         "score.decode_batch=2", "score.rows_per_file=2", "score.device=cpu",
                         "score.max_actors=2"], config.ScoreJob)
said = {"at_start": list(job.placement(cfg.score, steel_cluster.capacity()).__dict__.values())}
result = {}
scoring = threading.Thread(target=lambda: result.update(summary=job.run(cfg)))
scoring.start()
part = os.path.join(root, "out", "run_date=2026-11-28")
deadline = time.monotonic() + 300
while not any("Scorer" in a.class_name for a in list_actors(address=cluster.address, filters=[("state", "=", "ALIVE")])):
    assert time.monotonic() < deadline and scoring.is_alive(), "no model actor within 300 s"
    time.sleep(0.5)
said["written_at_join"] = len(os.listdir(part)) if os.path.isdir(part) else 0
cluster.add_node(num_cpus=2)  # a node joins mid-job
scoring.join(600)
s = result["summary"]
said.update(inputs=s.inputs, scored=s.scored, actors=s.actors, actor_nodes=s.actor_nodes, device=s.device)
cluster.add_node(num_cpus=1, num_gpus=1)  # a GPU node (a resource only: placement reads it, nothing runs)
auto = config.load(None, [f"score.input={root}/in", f"score.checkpoint={ckpt}"], config.ScoreJob)
said["auto_with_a_gpu_node"] = list(job.placement(auto.score, steel_cluster.capacity()).__dict__.values())
print("RESULT", json.dumps(said), flush=True)
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.slow
def test_the_scoring_pool_grows_when_a_node_joins_mid_job(tmp_path, sheets, ray_tmp):
    """Two CPUs at the start hold one model actor and its decode task; a node that joins mid-job
    (the autoscaler's, or a spot node coming back) gets a second model actor in the same run, up to
    score.max_actors. A GPU node's resource alone turns score.device=auto to cuda. Slow (opt-in):
    Ray Data takes in a new node's resources only after a while (its autoscaling coordinator
    refreshes what it reserves periodically), so the job needs minutes of work."""
    said = scenario(POOL_GROWS, tmp_path, sheets, 216, "resnet34", (256, 1600), ray_tmp)
    assert said["at_start"] == ["cpu", 1, 2, 1], said
    assert (said["inputs"], said["scored"]) == (216, 216), said
    assert said["written_at_join"] < 30, "the job was far along when the node joined: make it slower"
    assert said["device"] == "cpu" and said["actors"] == 2, said
    assert said["auto_with_a_gpu_node"] == ["cuda", 1, 1, 1], said


TRAIN_NODE_LOST = """
import json, os, sys, threading, time
import pandas as pd
import ray, s3fs
from ray.cluster_utils import Cluster
from ray.util.state import list_actors
from steelray import config, train

bucket, endpoint = sys.argv[1:]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
ray.init(address=cluster.address)
cfg = config.load("jobs/configs/neu.yaml", [
    f"data.root={bucket}/neu", "model.name=simple_cnn", "input.size=[160,160]", "train.loader_workers=0",
    "train.batch_size=4", "train.epochs=5", f"ray.storage_path={bucket}/runs", "ray.run_name=lost",
    "ray.num_workers=1", "ray.max_failures=1", f"s3.endpoint_url={endpoint}"])
result = {}
fitting = threading.Thread(target=lambda: result.update(fit=train.fit(cfg)))
fitting.start()
fs = s3fs.S3FileSystem(endpoint_url=endpoint)
deadline = time.monotonic() + 300
while True:  # epoch 2's folder: epoch 1's checkpoint is registered
    fs.invalidate_cache()
    if fs.exists(f"{bucket}/runs/lost/epoch-0002"):
        break
    assert time.monotonic() < deadline and fitting.is_alive(), "no second epoch within 300 s"
    time.sleep(0.2)
worker = list_actors(address=cluster.address, filters=[("class_name", "=", "RayTrainWorker"),
                                                    ("state", "=", "ALIVE")])[0]
lost = next(w for w in workers if w.node_id == worker.node_id)
cluster.remove_node(lost)
fitting.join(600)
fs.invalidate_cache()
rows = pd.read_csv(fs.open(f"{bucket}/runs/lost/metrics.csv"))
alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
print("RESULT", json.dumps({"epochs": rows["epoch"].tolist(), "resumed": rows["resumed_from_epoch"].tolist(),
                            "best": result["fit"].best_checkpoint, "lost": lost.node_id,
                            "worker_nodes": sorted({a.node_id for a in list_actors(address=cluster.address, filters=[("class_name", "=", "RayTrainWorker")])}),
                            "alive": alive}), flush=True)
ray.shutdown()
cluster.shutdown()
"""


def test_a_training_node_lost_mid_run_resumes_from_its_s3_checkpoint_on_another_node(bucket, s3_endpoint, ray_tmp):
    """A spot reclaim during training: the node of the only training worker goes after epoch 1's
    checkpoint reached S3 (moto). Ray Train starts the worker on the other node; it resumes from
    that checkpoint and the run ends with each epoch once."""
    said = on_s3(TRAIN_NODE_LOST, bucket, s3_endpoint, ray_tmp)
    assert said["epochs"] == [1, 2, 3, 4, 5], said
    assert said["resumed"][0] == 0 and said["resumed"][-1] >= 1, "the new worker started over instead of resuming"
    assert said["best"].startswith(f"{bucket}/runs/lost/epoch-"), said
    assert said["lost"] not in said["alive"] and len(said["worker_nodes"]) == 2, said


SWEEP_NODE_LOST = """
import json, sys, threading, time
import pandas as pd
import ray, s3fs
from ray.cluster_utils import Cluster
from ray.util.state import list_actors
from steelray import config, tune

bucket, endpoint = sys.argv[1:]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "resources": {"trial_driver": 4}})
workers = [cluster.add_node(num_cpus=1) for _ in range(3)]  # two trials at a time, and one node spare
ray.init(address=cluster.address)
cfg = config.load("jobs/configs/neu.yaml", [
    f"data.root={bucket}/neu", "model.name=simple_cnn", "input.size=[160,160]", "train.loader_workers=0",
    "train.batch_size=4", "train.epochs=5", f"ray.storage_path={bucket}/sweeps", "ray.num_workers=1",
    "ray.max_failures=1", "tune.name=sw", "tune.search=grid", "tune.num_samples=1", "tune.scheduler=none", "tune.max_concurrent=2",
    "tune.space={train.lr: {choice: [1e-3, 3e-3]}}", f"s3.endpoint_url={endpoint}"])
result = {}
sweeping = threading.Thread(target=lambda: result.update(sweep=tune.run(cfg)))
sweeping.start()
fs = s3fs.S3FileSystem(endpoint_url=endpoint)
deadline = time.monotonic() + 400
while True:  # both trials past epoch 1's checkpoint
    fs.invalidate_cache()
    if len(fs.glob(f"{bucket}/sweeps/sw/train/*/epoch-0002")) == 2:
        break
    assert time.monotonic() < deadline and sweeping.is_alive(), "two trials did not reach epoch 2 within 400 s"
    time.sleep(0.5)
worker = list_actors(address=cluster.address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])[0]
cluster.remove_node(next(w for w in workers if w.node_id == worker.node_id))
sweeping.join(900)
trials = result["sweep"].trials
fs.invalidate_cache()
runs = {t: pd.read_csv(fs.open(f"{bucket}/sweeps/sw/train/{t}/metrics.csv")) for t in trials.trial_id}
print("RESULT", json.dumps({"status": trials.status.tolist(), "epochs": trials.epochs.tolist(),
                            "runs": {t: {"epochs": r.epoch.tolist(), "resumed": r.resumed_from_epoch.tolist()}
                                     for t, r in runs.items()}}), flush=True)
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.slow
def test_a_sweep_trials_node_lost_resumes_that_trial_and_leaves_the_other(bucket, s3_endpoint, ray_tmp):
    """Two trials at once, each with its training worker on a node of its own: one of those nodes
    goes after both trials checkpointed epoch 1 (moto S3). That trial's Train run resumes on the
    spare node from its checkpoint; the other trial runs on untouched; both end with every epoch."""
    said = on_s3(SWEEP_NODE_LOST, bucket, s3_endpoint, ray_tmp)
    assert said["status"] == ["completed", "completed"] and said["epochs"] == [5, 5], said
    runs = list(said["runs"].values())
    assert all(r["epochs"] == [1, 2, 3, 4, 5] for r in runs), said
    assert sorted(max(r["resumed"]) >= 1 for r in runs) == [False, True], "one trial resumed, the other ran on"
