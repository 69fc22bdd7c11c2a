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
    """``n`` synthetic sheets under ``tmp_path/in`` and an untrained ``model`` checkpoint at
    ``tmp_path/ckpt``; then ``script`` (argv: the folder, the checkpoint) in a fresh process on a
    Ray of its own; returns its RESULT."""
    for name in sorted(os.listdir(sheets.images))[:n]:
        storage.write_bytes(str(tmp_path / "in" / name), storage.read_bytes(os.path.join(sheets.images, name)))
    cfg = config.load(None, ["task=multilabel", f"model.name={model}", f"input.size=[{size[0]},{size[1]}]",
                             "data.format=severstal"])
    checkpoint.write(str(tmp_path / "ckpt"), models.build_model(cfg, 4),
                     checkpoint.make_meta(cfg, data.SEVERSTAL_CLASSES, models.preprocess_for(cfg)))
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(tmp_path / "ckpt")], cwd=REPO,
                         capture_output=True, text=True, timeout=900, env=env)
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
actor = next(a for a in list_actors(filters=[("state", "=", "ALIVE")]) if "Scorer" in a.class_name)
lost = next(w for w in workers if w.node_id == actor.node_id)
written = len(os.listdir(part))
cluster.remove_node(lost)
scoring.join(600)
s = result["summary"]
print("RESULT", json.dumps({"inputs": s.inputs, "scored": s.scored, "errored": s.errored, "written_at_loss": written}), flush=True)
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
    df = pd.read_parquet(tmp_path / "out")
    assert len(df) == 16 and df.source_uri.is_unique and df.error.isna().all()
    part = tmp_path / "out" / "run_date=2026-11-28"
    assert not [f for f in os.listdir(part) if f.startswith(".")]
