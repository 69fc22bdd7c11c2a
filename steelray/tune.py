"""Hyperparameter sweeps on Ray Tune over the ordinary training code (``jobs/tune.py``).

Each trial is a Tune function trainable, a small driver that runs ``train.fit`` (a TorchTrainer
with its own workers) and forwards every epoch's metrics to Tune through ``TuneReportCallback``:
the pattern Ray recommends for Train V2 (``Tuner(TorchTrainer)`` is deprecated). Drivers take no
CPU but one unit of the custom ``trial_driver`` resource, so a trial never starves its own workers,
and the number of concurrent trials is capped by what the cluster's CPUs and GPUs hold.

The sweep folder (``<ray.storage_path>/<tune.name>``, local or S3) holds Tune's state, every
trial's Train run under ``train/<trial id>``, and the results: ``trials.csv`` / ``trials.parquet``
(one row per trial) and ``best.yaml`` (a training config with the best trial's values, ready for
``jobs/train.py``). Running the same sweep name again resumes it: finished trials are kept, the
unfinished ones continue from their last checkpoint.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass, replace

import pandas as pd
import yaml

from steelray import cluster, config, data, storage, tracking, train
from steelray.config import Config

# The Optuna study users ran before: 5 trials over these, maximising validation macro-F1.
DEFAULT_SPACE = {
    "train.lr": {"loguniform": [1e-5, 1e-2]},
    "train.batch_size": {"choice": [16, 32, 64]},
    "model.freeze_stages": {"choice": [0, 1, 2, 3, 4]},
    "train.scheduler": {"choice": ["none", "cosine"]},
}
DEFAULT_SAMPLES = 5
LOCAL_DRIVERS = 16  # trial_driver units a local Ray started here declares (CPUs cap trials anyway)


class SweepError(RuntimeError):
    """The sweep cannot run on this cluster as configured."""


@dataclass
class SweepResult:
    sweep_uri: str
    trials: pd.DataFrame
    metric: str
    best_config: str        # URI of best.yaml
    best_checkpoint: str
    best_value: float
    resumed: bool
    tracking: str = ""      # the sweep's MLflow run, or why tracking stopped


def run(cfg: Config) -> SweepResult:
    """Run (or resume) the sweep ``cfg.tune`` describes over the training config ``cfg``."""
    from ray import tune as ray_tune

    metric = train.target_metric(cfg)
    cfg = with_space(cfg)
    name = cfg.tune.name or f"sweep-{cfg.task}-{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    root = storage.absolute(cfg.ray.storage_path)
    sweep_uri = storage.join(root, name)
    cluster.check_shared([("data.root", cfg.data.root), ("ray.storage_path", cfg.ray.storage_path)],
                         cfg.ray.shared_paths, cfg.ray.address)
    manifest = data.build_manifest(cfg)
    prepared = train.prepare(cfg, manifest)
    connect(cfg)
    concurrent = max_concurrent(cfg)
    parent = tracking.start_sweep(cfg, sweep_uri, name, metric)
    storage_path, fs = storage.pyarrow_filesystem(root, cfg.s3)
    params, choices = param_space(cfg.tune)
    base = {k: v for k, v in config.to_dict(cfg, redact=False).items() if k != "tune"}
    trainable = ray_tune.with_resources(
        ray_tune.with_parameters(_trial, base=base, choices=choices, prepared=prepared, sweep_uri=sweep_uri,
                                 manifest=manifest if "data.fold" in cfg.tune.space else None,
                                 parent=parent.info()),
        {"cpu": 0, "trial_driver": 1})
    state_path = f"{storage_path}/{name}"
    resumed = ray_tune.Tuner.can_restore(state_path, storage_filesystem=fs)
    print(f"{'resuming' if resumed else 'starting'} sweep {sweep_uri}: {cfg.tune.search} search, "
          f"{cfg.tune.scheduler} scheduler on {metric}, up to {concurrent} trial(s) at once, "
          f"{len(prepared.train)} training / {len(prepared.val)} validation images", flush=True)
    if resumed:  # finished and failed trials are kept; unfinished ones continue from their checkpoints
        tuner = ray_tune.Tuner.restore(state_path, trainable, resume_unfinished=True, resume_errored=False,
                                       restart_errored=False, storage_filesystem=fs)
    else:
        tuner = ray_tune.Tuner(
            trainable, param_space=params,
            tune_config=ray_tune.TuneConfig(
                metric=metric, mode=train.mode(metric), num_samples=num_samples(cfg.tune),
                search_alg=search_algorithm(cfg.tune, metric, concurrent), scheduler=scheduler(cfg, metric),
                max_concurrent_trials=concurrent),
            run_config=ray_tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=fs,
                                          failure_config=ray_tune.FailureConfig(max_failures=0)))
    try:
        grid = tuner.fit()
    except BaseException:
        parent.end("FAILED")
        raise
    trials = trial_table(grid, cfg, metric, choices, sweep_uri)
    write_table(trials, sweep_uri, cfg)
    finished = trials[trials["status"] != "failed"].dropna(subset=[metric])
    files = {"trials.csv": trials.to_csv(index=False)}
    if not finished.empty:
        best = finished.sort_values(metric, ascending=train.mode(metric) == "min", kind="stable").iloc[0]
        best_config = write_best_config(cfg, best, metric, sweep_uri)
        files["best.yaml"] = storage.read_text(best_config, cfg.s3)
    tracking.end_sweep(parent, trials, metric, sweep_uri, files)
    if finished.empty:
        raise SweepError(f"sweep {sweep_uri}: no trial reported {metric}; see {sweep_uri}/trials.csv")
    return SweepResult(sweep_uri, trials, metric, best_config, best["checkpoint"], float(best[metric]), resumed,
                       parent.summary())


def with_space(cfg: Config) -> Config:
    """``cfg`` with the default search space filled in (and checked) when it names none."""
    if cfg.tune.space:
        return cfg
    raw = config.to_dict(cfg, redact=False)
    raw["tune"]["space"] = {k: dict(v) for k, v in DEFAULT_SPACE.items()}
    return config.from_dict(raw)


# --- the trial ----------------------------------------------------------------------------------

def _trial(params: dict, base: dict, choices: dict, prepared: train.Prepared, sweep_uri: str,
           manifest: data.Manifest | None = None, parent: dict | None = None) -> None:
    """One trial: the training config with this trial's values, trained by ``train.fit`` as usual.
    Its Train run is named after the trial, so a resumed sweep resumes the run from its checkpoint.
    A sweep over ``data.fold`` (cross-validation) splits the manifest for each trial's fold. Its
    MLflow run, if tracked, is a child of the sweep's (``parent``)."""
    from ray import tune as ray_tune
    from ray.tune.integration.ray_train import TuneReportCallback

    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in decode(params, choices).items():
        section, _, name = key.partition(".")
        raw[section][name] = value
    cfg = config.from_dict(raw)
    trial_id = ray_tune.get_context().get_trial_id()
    cfg = replace(cfg, ray=replace(cfg.ray, storage_path=storage.join(sweep_uri, "train"), run_name=trial_id))
    if manifest is not None:
        prepared = train.prepare(cfg, manifest)
    train.fit(cfg, prepared, callbacks=[TuneReportCallback()], parent=parent)


# --- search space, search algorithm, scheduler, resources ---------------------------------------

def param_space(t: config.TuneConfig) -> tuple[dict, dict]:
    """Tune's search space for ``tune.space``, and the choice lists that travel as indices
    (values that are not plain scalars, e.g. input.size [h, w], which samplers cannot hold)."""
    from ray import tune as ray_tune

    params, choices = {}, {}
    for key, spec in t.space.items():
        (kind, values), = spec.items()
        if kind in ("choice", "grid") and not all(isinstance(v, (bool, int, float, str)) for v in values):
            choices[key] = list(values)
            values = list(range(len(values)))
        if kind == "loguniform":
            params[key] = ray_tune.loguniform(*values)
        elif kind == "uniform":
            params[key] = ray_tune.uniform(*values)
        elif kind == "int":
            params[key] = ray_tune.randint(values[0], values[1] + 1)  # ours is inclusive, Tune's is not
        elif kind == "grid" or t.search == "grid":
            params[key] = ray_tune.grid_search(values)
        else:
            params[key] = ray_tune.choice(values)
    return params, choices


def decode(params: dict, choices: dict) -> dict:
    """A trial's values as config values (choice indices back to the listed values)."""
    return {k: choices[k][v] if k in choices else v for k, v in params.items()}


def num_samples(t: config.TuneConfig) -> int:
    if t.num_samples:
        return t.num_samples
    return 1 if t.search == "grid" or any("grid" in s for s in t.space.values()) else DEFAULT_SAMPLES


def search_algorithm(t: config.TuneConfig, metric: str, concurrent: int = 0):
    """Tune's search algorithm; ``concurrent`` caps running trials (Tune's own max_concurrent_trials
    is not applied to a BasicVariantGenerator that is passed in, so it is set here too)."""
    if t.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
            import optuna  # noqa: F401
        except ImportError:
            raise SweepError("tune.search=optuna needs the optuna package: pip install 'steelray[optuna]' "
                             "(or pip install optuna)") from None
        return OptunaSearch(metric=metric, mode=train.mode(metric), seed=t.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=t.seed, max_concurrent=concurrent)


def scheduler(cfg: Config, metric: str):
    """ASHA over epochs: a trial that lags at a rung (grace_period x reduction_factor^k epochs) stops."""
    if cfg.tune.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    epochs = [cfg.train.epochs] + [max(s.get("choice", s.get("grid", s.get("int", [0]))))
                                   for k, s in cfg.tune.space.items() if k == "train.epochs"]
    max_t = max(epochs)
    return ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=min(cfg.tune.grace_period, max_t),
                         reduction_factor=cfg.tune.reduction_factor)


def connect(cfg: Config) -> None:
    """Join the cluster (``ray.address``, RAY_ADDRESS, or one running here); else start a local Ray
    that declares the ``trial_driver`` resource. ``ray.address=local`` always starts a fresh one."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address
    if address != "local":
        try:
            ray.init(address=address or "auto")
            return
        except ConnectionError:
            if address:
                raise
    ray.init(resources={"trial_driver": LOCAL_DRIVERS})


def max_concurrent(cfg: Config) -> int:
    """How many trials run at once: tune.max_concurrent, or what the cluster holds now (each trial
    needs ray.num_workers x cpus_per_worker CPUs, a GPU per worker with use_gpu, one trial_driver)."""
    import ray

    have = ray.cluster_resources()
    drivers = int(have.get("trial_driver", 0))
    if drivers < 1:
        raise SweepError("this Ray cluster declares no 'trial_driver' resource, which trial drivers run on "
                         "(so that they take no CPU from their workers): start the head with "
                         "`ray start --head --resources='{\"trial_driver\": 8}'`; cluster.yaml declares it")
    if cfg.tune.max_concurrent:  # e.g. an autoscaling cluster that grows as trials queue
        return cfg.tune.max_concurrent
    cpus = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    fits = [drivers]
    if cpus:
        fits.append(int(have.get("CPU", 0) // cpus))
    if cfg.ray.use_gpu:
        fits.append(int(have.get("GPU", 0) // cfg.ray.num_workers))
    n = min(fits)
    if n < 1:
        raise SweepError(f"one trial needs {cpus:g} CPUs{' and %d GPUs' % cfg.ray.num_workers if cfg.ray.use_gpu else ''}"
                         f" (ray.num_workers x ray.cpus_per_worker), the cluster has {have.get('CPU', 0):g} CPUs"
                         f" and {have.get('GPU', 0):g} GPUs; lower ray.num_workers or set tune.max_concurrent "
                         "on an autoscaling cluster")
    return n


# --- results ------------------------------------------------------------------------------------

def trial_table(grid, cfg: Config, metric: str, choices: dict, sweep_uri: str) -> pd.DataFrame:
    """One row per trial: id, status (completed / stopped early / failed), its values, the best
    metric and its epoch, epochs run, seconds, the best checkpoint, and the error if it failed."""
    rows = []
    for result in grid:
        history = result.metrics_dataframe
        history = history if history is not None and not history.empty else pd.DataFrame()
        trial_id = result.metrics.get("trial_id") or _trial_id(result.path)
        history = train_history(sweep_uri, trial_id, cfg, history)
        values = decode(result.config, choices)
        epochs_planned = values.get("train.epochs", cfg.train.epochs)
        row = {"trial_id": trial_id, "status": "", **values, metric: math.nan, "best_epoch": pd.NA,
               "epochs": int(history["epoch"].max()) if "epoch" in history else 0,
               "seconds": round(float(result.metrics.get("time_total_s", math.nan)), 1),
               "checkpoint": "", "error": ""}
        if metric in history and history[metric].notna().any():
            kept = kept_epochs(sweep_uri, trial_id, cfg)
            best = best_epoch(history, metric, kept)
            row[metric], row["best_epoch"] = float(best[metric]), int(best["epoch"])
            # the checkpoint the run kept: the best epoch's, or (train.keep: last) the newest
            row["checkpoint"] = best.get("kept", "") or (kept[max(kept)] if kept else "")
        if result.error is not None:
            row["status"], row["error"] = "failed", error_line(result.error)
        elif row["epochs"] < epochs_planned:
            row["status"] = "stopped early"
        else:
            row["status"] = "completed"
        rows.append(row)
    return pd.DataFrame(rows)


def train_history(sweep_uri: str, trial_id: str, cfg: Config, reported: pd.DataFrame) -> pd.DataFrame:
    """The trial's epochs as its Train run wrote them (``metrics.csv``) when that holds more than Tune
    recorded: a sweep killed after a run's last epoch but before Tune saved it resumes that trial,
    whose run then has nothing left to train and reports nothing new."""
    try:
        text = storage.read_text(storage.join(sweep_uri, "train", trial_id, "metrics.csv"), cfg.s3)
    except FileNotFoundError:
        return reported
    written = pd.read_csv(io.StringIO(text))
    if "epoch" not in written or ("epoch" in reported and written["epoch"].max() <= reported["epoch"].max()):
        return reported
    return written


def _trial_id(path: str) -> str:
    """Tune names trial folders <trainable>_<trial id>_<index>_<values>..."""
    parts = path.rstrip("/").rsplit("/", 1)[-1].split("_")
    return "_".join(parts[2:4]) if len(parts) > 3 and parts[1] == "trial" else parts[-1]


def kept_epochs(sweep_uri: str, trial_id: str, cfg: Config) -> dict[int, str]:
    """The checkpoints a trial's Train run kept (its best epoch's), by epoch."""
    folder = storage.join(sweep_uri, "train", trial_id)
    names = storage.list_names(folder, cfg.s3)
    return {int(n[len("epoch-"):]): storage.join(folder, n) for n in names
            if n.startswith("epoch-") and n[len("epoch-"):].isdigit()}


def best_epoch(history: pd.DataFrame, metric: str, kept: dict[int, str]) -> pd.Series:
    """The epoch with the best metric, preferring (among equals) the one whose checkpoint was kept."""
    ranked = history.dropna(subset=[metric]).copy()
    ranked["kept"] = ranked["epoch"].map(kept).fillna("")
    ranked = ranked.sort_values([metric, "epoch"], ascending=[train.mode(metric) == "min", False], kind="stable")
    top = ranked[ranked[metric] == ranked[metric].iloc[0]]
    with_checkpoint = top[top["kept"] != ""]
    return (with_checkpoint if len(with_checkpoint) else top).iloc[0]


def error_line(error: BaseException) -> str:
    """The line of a trial's error that says what went wrong (Train wraps the worker's traceback)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    said = [ln for ln in lines if not ln.startswith(("File ", "Traceback", "^", "~")) and ":" in ln
            and ln.split(":", 1)[0].replace(".", "").isidentifier() and ln.split(":", 1)[0].endswith(("Error", "Exception"))]
    return (said[-1] if said else lines[-1] if lines else type(error).__name__)[:500]


def write_table(trials: pd.DataFrame, sweep_uri: str, cfg: Config) -> None:
    storage.write_text(storage.join(sweep_uri, "trials.csv"), trials.to_csv(index=False), cfg.s3)
    buf = io.BytesIO()
    trials.astype({"best_epoch": "Int64"}).to_parquet(buf, index=False)
    storage.write_bytes(storage.join(sweep_uri, "trials.parquet"), buf.getvalue(), cfg.s3)


def write_best_config(cfg: Config, best, metric: str, sweep_uri: str) -> str:
    """The training config with the best trial's values: ``jobs/train.py --config best.yaml``.
    Credentials are left empty (they come from the environment), never written out."""
    raw = {k: v for k, v in config.to_dict(cfg).items() if k != "tune"}
    for key in cfg.tune.space:
        section, _, name = key.partition(".")
        raw[section][name] = _plain(best[key])
    raw["ray"]["run_name"] = ""
    raw["s3"] = {k: ("" if v == config.SECRET_MASK else v) for k, v in raw["s3"].items()}
    config.from_dict(raw)  # what we write must load
    header = (f"# Best trial of sweep {sweep_uri}: {best['trial_id']}, {metric} {best[metric]:.4g} at epoch "
              f"{best['best_epoch']}.\n# Train it: python jobs/train.py --config <this file>\n")
    uri = storage.join(sweep_uri, "best.yaml")
    storage.write_text(uri, header + yaml.safe_dump(raw, sort_keys=False), cfg.s3)
    return uri


def _plain(value):
    """numpy scalars from the table back to Python values for YAML."""
    return value.item() if hasattr(value, "item") else value
