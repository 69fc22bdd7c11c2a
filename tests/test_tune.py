"""Ray Tune sweeps over the real training code: tiny models, synthetic NEU images, a local Ray."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from steelray import checkpoint, config, data, synth, tune

NEU = "jobs/configs/neu.yaml"
SMALL = ["model.name=simple_cnn", "input.size=[48,48]", "input.augment=none", "train.loader_workers=0",
         "train.warmup_epochs=0", "train.batch_size=8", "ray.num_workers=1",
         "tune.num_samples=0"]  # neu.yaml asks for 8 samples; 0: each grid point once


@pytest.fixture(scope="module")
def neu_small(tmp_path_factory):
    root = tmp_path_factory.mktemp("neu-tune")
    synth.make_neu(str(root), 6, seed=4, workers=1)
    return root


# --- the search space in the config (no Ray) ----------------------------------------------------

@pytest.mark.parametrize("space, says", [
    ("{data.seed: {choice: [1, 2]}}", "section one of model, input, train"),
    ("{train.nope: {choice: [1]}}", "train.nope: unknown key"),
    ("{train.lr: {loguniform: [0, 1e-2]}}", "low > 0"),
    ("{train.lr: {uniform: [1e-2, 1e-3]}}", "low < high"),
    ("{train.lr: {normal: [0, 1]}}", "expected one of"),
    ("{train.batch_size: {int: [8, 16.5]}}", "(integers)"),
    ("{model.freeze_stages: {choice: [0, 9]}}", "value 9 does not make a valid config: model.freeze_stages: must be <= 5"),
    ("{train.scheduler: {choice: [none, linear]}}", "'linear' is not a valid choice"),
    ("{train.lr: {choice: []}}", "needs a non-empty list"),
])
def test_bad_search_space_names_the_entry_and_the_problem(space, says):
    with pytest.raises(config.ConfigError, match="tune.space") as e:
        config.load(NEU, [f"tune.space={space}"])
    assert says in str(e.value)


def test_search_and_space_must_agree():
    with pytest.raises(config.ConfigError, match="tune.search=grid tries listed values only"):
        config.load(NEU, ["tune.search=grid", "tune.space={train.lr: {loguniform: [1e-5, 1e-2]}}"])
    with pytest.raises(config.ConfigError, match="optuna samples, it cannot take grid"):
        config.load(NEU, ["tune.search=optuna", "tune.space={train.lr: {grid: [1e-3, 1e-2]}}"])


def test_default_space_is_the_optuna_study_and_values_are_typed():
    cfg = tune.with_space(config.load(NEU, ["tune.space={}", "tune.num_samples=0"]))
    assert cfg.tune.space == tune.DEFAULT_SPACE and tune.num_samples(cfg.tune) == 5
    params, choices = tune.param_space(cfg.tune)
    assert set(params) == {"train.lr", "train.batch_size", "model.freeze_stages", "train.scheduler"}
    assert params["train.lr"].lower == 1e-5 and params["train.lr"].upper == 1e-2
    assert params["train.batch_size"].categories == [16, 32, 64] and not choices
    # YAML reads 3e-4 as a string: the space holds numbers; list choices travel as indices
    cfg = config.load(NEU, ["tune.space={train.lr: {choice: [3e-4, 1e-3]}, input.size: {choice: [[64,64],[96,96]]}}"])
    assert cfg.tune.space["train.lr"] == {"choice": [3e-4, 1e-3]}
    params, choices = tune.param_space(cfg.tune)
    assert params["input.size"].categories == [0, 1]
    assert tune.decode({"input.size": 1, "train.lr": 1e-3}, choices) == {"input.size": [96, 96], "train.lr": 1e-3}
    grid = config.load(NEU, ["tune.search=grid", "tune.num_samples=0", "tune.space={train.lr: {choice: [1e-3, 1e-2]}}"])
    assert tune.param_space(grid.tune)[0]["train.lr"] == {"grid_search": [1e-3, 1e-2]}
    assert tune.num_samples(grid.tune) == 1


def test_asha_runs_on_epochs_up_to_the_longest_trial():
    cfg = config.load(NEU, ["train.epochs=6", "tune.grace_period=2", "tune.reduction_factor=3"])
    asha = tune.scheduler(cfg, "macro_f1")
    assert (asha._time_attr, asha._max_t, asha._reduction_factor) == ("epoch", 6, 3)
    assert [b._rungs for b in asha._brackets][0][-1][0] == 2  # first rung at the grace period
    cfg = config.load(NEU, ["train.epochs=6", "tune.space={train.epochs: {choice: [4, 12]}}"])
    assert tune.scheduler(cfg, "macro_f1")._max_t == 12
    assert tune.scheduler(config.load(NEU, ["tune.scheduler=none"]), "macro_f1") is None


# --- sweeps on a local Ray ------------------------------------------------------------------------

def test_sweep_with_asha_writes_table_and_best_yaml_and_a_nan_trial_fails(ray_local, tmp_path, neu_small,
                                                                          mlflow_server):
    """3 trials on 2 CPUs (2 at a time); lr 1e30 diverges to NaN: that trial fails readably, the
    others finish; the best config is a training config. Tracked: a parent run, a child per trial."""
    cfg = config.load(NEU, [f"data.root={neu_small}", *SMALL, "train.epochs=3", f"ray.storage_path={tmp_path}",
                            "tune.name=sw", "tune.search=grid", "tune.grace_period=1",
                            "tune.space={train.lr: {choice: [1e-3, 1e30, 1e-2]}}",
                            f"tracking.uri={mlflow_server}", "tracking.experiment=sweep-asha"])
    result = tune.run(cfg)
    t = result.trials.set_index("train.lr")
    assert len(t) == 3 and t.trial_id.is_unique
    assert t.loc[1e30, "status"] == "failed" and t.loc[1e30, "epochs"] == 0
    assert "FloatingPointError: training diverged at epoch 1: train_loss nan" in t.loc[1e30, "error"]
    others = t.drop(index=1e30)
    assert set(others.status) <= {"completed", "stopped early"} and (others.error == "").all()
    assert ((others.status == "stopped early") == (others.epochs < 3)).all() and (others.epochs >= 1).all()
    assert others.macro_f1.between(0, 1).all()
    # the table on disk, both forms, says the same
    for table in (pd.read_csv(tmp_path / "sw" / "trials.csv"), pd.read_parquet(tmp_path / "sw" / "trials.parquet")):
        assert sorted(table.trial_id) == sorted(t.trial_id) and (table.status == "failed").sum() == 1
    # best: the highest macro-F1 of a finished trial; its checkpoint is the one its Train run kept
    best = others.sort_values("macro_f1", ascending=False).iloc[0]
    assert result.best_value == best.macro_f1 and result.best_checkpoint == best.checkpoint
    assert Path(result.best_checkpoint).name == f"epoch-{best.best_epoch:04d}"
    model, meta = checkpoint.load_model(result.best_checkpoint)
    assert meta["metrics"]["macro_f1"] == pytest.approx(best.macro_f1)
    # best.yaml is a valid training config (config.load checks every key and value) with the best lr
    best_cfg = config.load(result.best_config)
    assert best_cfg.train.lr == best.name and best_cfg.model.name == "simple_cnn" and best_cfg.train.epochs == 3
    assert best_cfg.data.root == str(neu_small) and best_cfg.ray.run_name == "" and not best_cfg.tune.space
    assert "Best trial of sweep" in Path(result.best_config).read_text()
    # MLflow: the sweep a parent run, each trial a child with its status, sampled value and best figure
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=mlflow_server)
    exp = c.get_experiment_by_name("sweep-asha").experiment_id
    parent, = c.search_runs([exp], "tags.`steelray.job` = 'sweep'")
    assert result.tracking == f"tracking: MLflow run {parent.info.run_id} at {mlflow_server}"
    assert parent.info.status == "FINISHED" and parent.data.tags["steelray.best_trial"] == best.trial_id
    assert parent.data.metrics["best_macro_f1"] == pytest.approx(best.macro_f1)
    children = c.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.data.tags["steelray.trial_id"] for r in children) == sorted(t.trial_id)
    status = {"completed": "FINISHED", "stopped early": "KILLED", "failed": "FAILED"}
    for child in children:
        row = t[t.trial_id == child.data.tags["steelray.trial_id"]].iloc[0]
        assert float(child.data.params["train.lr"]) == row.name
        assert (child.data.tags["steelray.status"], child.info.status) == (row.status, status[row.status])
        if row.status != "failed":
            assert child.data.metrics["best_macro_f1"] == pytest.approx(row.macro_f1)
            assert len(c.get_metric_history(child.info.run_id, "macro_f1")) == row.epochs
    assert "trials.csv" in {a.path for a in c.list_artifacts(parent.info.run_id)}


def test_optuna_sweep_on_s3_storage(ray_local, bucket, s3_endpoint, neu_small):
    """The Optuna TPE sampler through Ray Tune, with the sweep folder on S3. One trial: TPE's first
    suggestions are random startup trials anyway; what is checked is the wiring and the S3 folder."""
    import s3fs

    s3 = [f"s3.endpoint_url={s3_endpoint}", "s3.access_key_id=testing", "s3.secret_access_key=testing",
          "s3.region=us-east-1"]
    cfg = config.load(NEU, [f"data.root={neu_small}", *SMALL, "train.epochs=1", f"ray.storage_path={bucket}/sweeps",
                            "tune.name=opt", "tune.search=optuna", "tune.num_samples=1", "tune.scheduler=none",
                            "tune.space={train.lr: {loguniform: [1e-4, 1e-2]}, train.batch_size: {choice: [4, 8]}}",
                            *s3])
    result = tune.run(cfg)
    t = result.trials
    assert len(t) == 1 and (t.status == "completed").all()
    assert t["train.lr"].between(1e-4, 1e-2).all() and set(t["train.batch_size"]) <= {4, 8}
    assert result.best_checkpoint.startswith(f"{bucket}/sweeps/opt/train/")
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    assert fs.exists(f"{result.best_checkpoint}/model.safetensors")
    assert len(pd.read_parquet(f"{bucket}/sweeps/opt/trials.parquet",
                               storage_options={"endpoint_url": s3_endpoint})) == 1
    best = config.load(f"{bucket}/sweeps/opt/best.yaml")
    assert best.s3.secret_access_key == ""  # credentials are never written out


def test_cluster_too_small_for_one_trial_is_a_clear_error(ray_local, tmp_path, neu_small):
    cfg = config.load(NEU, [f"data.root={neu_small}", "ray.num_workers=3", f"ray.storage_path={tmp_path}"])
    with pytest.raises(tune.SweepError, match=r"one trial needs 3 CPUs .* the cluster has 2 CPUs"):
        tune.run(cfg)


# --- the job, killed and resumed ------------------------------------------------------------------

def test_killed_sweep_resumes_without_redoing_finished_trials(tmp_path, neu_small):
    """jobs/tune.py on its own local Ray is killed (SIGKILL, with its Ray) while its second trial
    trains; the same command again finishes the sweep and leaves the finished trial alone."""
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Unix socket paths must stay short
    cmd = [sys.executable, "jobs/tune.py", "--config", NEU, f"data.root={neu_small}", *SMALL, "train.epochs=2",
           f"ray.storage_path={tmp_path}", "ray.address=local", "tune.name=r", "tune.search=grid",
           "tune.scheduler=none", "tune.max_concurrent=1", "tune.space={train.lr: {choice: [1e-3, 3e-3]}}"]
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    env.pop("RAY_ADDRESS", None)
    sweep = tmp_path / "r"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while True:  # one trial finished, Tune's state saved after that, the next trial one epoch in
            done = list(sweep.glob("train/*/best_checkpoint.txt"))
            states = list(sweep.glob("experiment_state-*.json"))
            started = [p for p in sweep.glob("train/*/metrics.csv") if not (p.parent / "best_checkpoint.txt").exists()]
            if done and states and started and max(s.stat().st_mtime for s in states) > done[0].stat().st_mtime + 1:
                break
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.5)
        finished = done[0].parent
        before = {p.name: p.stat().st_mtime_ns for p in finished.rglob("*")}
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        log.close()
    assert not (sweep / "trials.csv").exists()

    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, start_new_session=True)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "(resumed)" in second.stdout and second.stdout.rstrip().splitlines()[-1].startswith("best checkpoint: ")
    trials = pd.read_csv(sweep / "trials.csv")
    assert len(trials) == 2 and (trials.status == "completed").all() and (trials.epochs == 2).all()
    assert {p.name: p.stat().st_mtime_ns for p in finished.rglob("*")} == before  # not touched again
    assert len(list(sweep.glob("train/*/best_checkpoint.txt"))) == 2


def test_trial_table_counts_the_epochs_the_train_run_wrote(tmp_path):
    """A sweep killed after a trial's last epoch but before Tune saved it: on resume the run has
    nothing left to train, so Tune holds only the epochs it saw; the run's metrics.csv has them all."""
    run = tmp_path / "train" / "abc_00001"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text("epoch,val_loss,macro_f1\n1,0.9,0.4\n2,0.7,0.6\n")
    cfg = config.load(NEU, [])
    seen = pd.DataFrame({"epoch": [1], "val_loss": [0.9], "macro_f1": [0.4]})
    assert tune.train_history(str(tmp_path), "abc_00001", cfg, seen)["epoch"].tolist() == [1, 2]
    both = pd.DataFrame({"epoch": [1, 2], "val_loss": [0.9, 0.7], "macro_f1": [0.4, 0.6]})
    assert tune.train_history(str(tmp_path), "abc_00001", cfg, both) is both
    assert tune.train_history(str(tmp_path), "other", cfg, seen) is seen


# --- cross-validation (jobs/crossval.py) ------------------------------------------------------------

@pytest.mark.slow  # a Ray Train run per fold; the fold sweep is the ordinary sweep tested above
def test_crossval_trains_every_fold_and_gives_each_folds_figures_and_their_spread(ray_local, tmp_path, neu_small):
    import json

    from steelray import crossval

    cfg = config.load(NEU, [f"data.root={neu_small}", *SMALL, "train.epochs=2", "data.folds=2",
                            f"ray.storage_path={tmp_path}", "tune.name=cv"])
    result = crossval.run(cfg)
    folds = pd.read_csv(tmp_path / "cv" / "folds.csv")
    assert folds.fold.tolist() == [0, 1] and (folds.status == "completed").all()
    assert (folds.last_epoch == 2).all() and folds.best_epoch.between(1, 2).all()
    for row in folds.itertuples():  # each fold's run trained on its own split, and kept its last epoch
        run_cfg = config.load(str(tmp_path / "cv" / "train" / row.trial_id / "config.yaml"))
        assert (run_cfg.data.fold, run_cfg.data.folds) == (row.fold, 2)
        assert row.checkpoint.endswith(f"epoch-{row.last_epoch:04d}") and run_cfg.train.keep == "last"
    from steelray import ensemble  # the fold models, as jobs/ensemble.py --crossval takes them

    assert ensemble.fold_models(str(tmp_path / "cv")) == folds.checkpoint.tolist()
    saved = json.loads((tmp_path / "cv" / "crossval.json").read_text())
    assert saved["metric"] == result["metric"] == "macro_f1" and len(saved["per_fold"]) == 2
    for column in ("best_macro_f1", "last_macro_f1", "best_accuracy", "last_val_loss"):
        a = saved["aggregate"][column]
        assert a["mean"] == pytest.approx(folds[column].mean()) and a["folds"] == 2
        assert a["std"] == pytest.approx(folds[column].std(ddof=1))
        assert a["min"] == pytest.approx(folds[column].min()) and a["max"] == pytest.approx(folds[column].max())
    # each fold model on its own validation images, with and without TTA, robustness passes included
    evaluated = crossval.evaluate_folds(str(tmp_path / "cv"), ["none", "flips"])
    assert json.loads((tmp_path / "cv" / "evaluation.json").read_text())["tta"].keys() == {"none", "flips"}
    for mode, ev in evaluated["tta"].items():
        rows = pd.DataFrame(ev["per_fold"])
        assert rows.fold.tolist() == [0, 1] and rows.checkpoint.tolist() == folds.checkpoint.tolist()
        assert rows.images.sum() == ev["out_of_fold"]["images"] == 6 * 6  # every image once, by the fold that held it out
        assert ev["out_of_fold"]["wrong"] == rows.wrong.sum() == len(ev["out_of_fold"]["wrong_images"])
        for row in ev["per_fold"]:  # which images, each one of this fold's and taken for another class
            assert len(row["wrong_images"]) == row["wrong"] == round((1 - row["accuracy"]) * row["images"])
            assert all(w["label"] != w["predicted"] and w["label"] in data.NEU_CLASSES for w in row["wrong_images"])
        assert ev["aggregate"]["accuracy"]["mean"] == pytest.approx(rows.accuracy.mean())
        assert {"drop_glare", "drop_crushed", "drop_noise"} <= ev["aggregate"].keys()
        if mode == "none":  # without TTA: the figures training reported at the kept (last) epoch
            assert rows.accuracy.tolist() == pytest.approx(folds.last_accuracy.tolist())
    # an ensemble recipe's figure: fold k judged by the ensemble of each sweep's fold-k model; the
    # sweep with itself (two identical members) must give the single models' figures
    twice = crossval.evaluate_folds(str(tmp_path / "cv"), ["none"], ensemble_with=[str(tmp_path / "cv")])
    assert twice["members"] == 2 and twice["written_to"].endswith("evaluation.json")
    assert json.loads(Path(twice["written_to"]).read_text())["sweeps"] == [str(tmp_path / "cv")] * 2
    for row, single in zip(twice["tta"]["none"]["per_fold"], evaluated["tta"]["none"]["per_fold"]):
        assert ensemble.read(row["checkpoint"])["members"] == [single["checkpoint"]] * 2
        assert (row["images"], row["wrong"]) == (single["images"], single["wrong"])
        assert row["macro_f1"] == pytest.approx(single["macro_f1"], abs=1e-6)
    # a routed recipe: clipped images to the route sweep's fold model (itself here: the same figures),
    # at the black share of that fold's training images
    from steelray import predict

    routed = crossval.evaluate_folds(str(tmp_path / "cv"), ["none"], route_with=str(tmp_path / "cv"))
    assert routed["route_sweep"] == str(tmp_path / "cv") and routed["written_to"] != twice["written_to"]
    for row, single, share in zip(routed["tta"]["none"]["per_fold"], evaluated["tta"]["none"]["per_fold"],
                                  routed["route_above"]):
        spec = ensemble.read(row["checkpoint"])
        assert spec["members"] == [single["checkpoint"]] and spec["route"]["model"] == single["checkpoint"]
        assert share == spec["route"]["black_share_above"] == predict.route_gate(single["checkpoint"])
        assert (row["wrong"], row["macro_f1"]) == (single["wrong"], pytest.approx(single["macro_f1"], abs=1e-6))


def _fake_sweep(folder: Path, datas: list[dict]) -> str:
    """A finished cross-validation's folder as far as its fold models' split: folds.csv and meta.json."""
    rows = ["fold,status,checkpoint"]
    for fold, d in enumerate(datas):
        ck = folder / f"fold{fold}" / "epoch-0002"
        ck.mkdir(parents=True)
        (ck / "meta.json").write_text(json.dumps({"config": {"data": d}}))
        rows.append(f"{fold},completed,{ck}")
    (folder / "folds.csv").write_text("\n".join(rows) + "\n")
    return str(folder)


def test_crossval_ensembles_only_sweeps_of_the_same_folds(tmp_path):
    from steelray import crossval, ensemble

    split = [{"root": "/data/neu", "folds": 2, "fold": k, "seed": 0} for k in range(2)]
    a = _fake_sweep(tmp_path / "a", split)
    three = _fake_sweep(tmp_path / "three", [{**split[0], "folds": 3, "fold": k} for k in range(3)])
    with pytest.raises(ensemble.EnsembleError, match=r"different numbers of folds: .*a \(2\), .*three \(3\)"):
        crossval.evaluate_folds(a, ["none"], ensemble_with=[three])
    reseeded = _fake_sweep(tmp_path / "reseeded", [split[0], {**split[1], "seed": 1}])
    with pytest.raises(ensemble.EnsembleError, match=r"fold 1: .*reseeded/fold1/epoch-0002 \(sweep .*reseeded\) was "
                                                     r"not trained on the same split as .*: data.seed 1 against 0"):
        crossval.evaluate_folds(a, ["none"], ensemble_with=[reseeded])
    with pytest.raises(ensemble.EnsembleError, match=r"fold 1: .*reseeded/fold1/epoch-0002 \(sweep .*reseeded\) was "):
        crossval.evaluate_folds(a, ["none"], route_with=reseeded)  # a route's models too
    assert not list(tmp_path.glob("a/ensemble-*/fold-*/ensemble.json"))  # refused before any ensemble is written


def test_crossval_needs_folds_and_turns_for_dihedral_tta(load_job, capsys):
    from steelray import cli, crossval

    with pytest.raises(config.ConfigError, match="data.folds: cross-validation needs >= 2 folds, got 0"):
        crossval.cv_config(config.load(NEU, []))
    main = load_job("crossval").main  # refused before Ray starts
    assert main(["--config", NEU, "data.folds=2", "input.turns=false", "--evaluate", "none,dihedral"]) == cli.BAD_ARGUMENTS
    assert "--evaluate dihedral: input.turns is false" in capsys.readouterr().err
    with pytest.raises(config.ConfigError, match="sweeping folds needs data.folds >= 2"):
        config.load(NEU, ["tune.space={data.fold: {grid: [0, 1]}}", "tune.search=grid"])
