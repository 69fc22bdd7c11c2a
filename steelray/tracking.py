"""Experiment tracking in MLflow, opt-in (``tracking.uri``): what training, sweeps and evaluations log.

    run = tracking.start(cfg.tracking, "steelray-multiclass", "neu-r18", key=("steelray.run_uri", uri))
    run.log_params({...}); run.log_metrics({"macro_f1": 0.98}, step=3); run.log_text(card, "model_card.md")
    run.end()

A run is found again by its key tag (a training run's folder, a sweep's folder), so a resumed run or
sweep goes on logging into the same MLflow run instead of starting a second one. A sweep is a parent
run; each trial's training run is its child (MLflow's ``mlflow.parentRunId`` tag).

Tracking never fails a job: the server is asked once at the start (``tracking.timeout`` seconds; a
server that is down costs that, not MLflow's several minutes of retries), and any error while
logging turns tracking off for the rest of the run with one warning, kept in ``run.warning`` for the
job's summary. The client is mlflow-skinny (``pip install 'steelray[tracking]'``): MLflow's tracking
and registry clients without its server, database layer and UI, which jobs never need; the sizes
are in docs/benchmarks.md. A local folder as ``tracking.uri`` is MLflow's file store (in
maintenance mode upstream, allowed here because the user chose it); ``sqlite:///...`` needs the full
``mlflow`` package.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass

from steelray.config_loader import setting

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests child runs under it
MAX_PARAM_LENGTH = 6000            # MLflow's limit on a parameter value


@dataclass
class TrackingConfig:
    """Where runs are tracked (MLflow) and where registered models are looked up (``models:/``)."""

    uri: str = ""                  # MLflow tracking server (http(s)://host:5000), databricks, sqlite:///...,
                                   # or a local folder; empty: tracking off (models:/ then reads
                                   # MLFLOW_TRACKING_URI)
    experiment: str = ""           # empty: steelray-<task>; an evaluation: its checkpoint's run's experiment
    timeout: float = setting(10.0, min=0.5)  # seconds per request; a server that is down is given up on
                                   # after one such wait, and tracking is off for that job
    cache: str = ""                # models:/ whose checkpoint folder is gone or changed are downloaded
                                   # here from the registry; empty: ~/.cache/steelray/models


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached, or MLflow is not installed."""


def store_uri(uri: str) -> str:
    """``tracking.uri`` as MLflow takes it: a local folder becomes an absolute ``file:`` URI."""
    if "://" in uri or uri.startswith(("databricks", "sqlite:", "file:")):
        return uri
    return "file://" + os.path.abspath(os.path.expanduser(uri))


def client(uri: str, timeout: float = 10.0):
    """An ``MlflowClient`` for tracking and registry at ``uri``, after checking the server answers.
    Raises ``TrackingUnavailable`` saying why not."""
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise TrackingUnavailable("tracking.uri is set but MLflow is not installed: pip install "
                                  "'steelray[tracking]' (mlflow-skinny)") from None
    uri = store_uri(uri)
    _bound(uri, timeout)
    if uri.startswith(("http://", "https://")):
        import requests

        try:  # any HTTP answer (even 401 or 404) means a server is there; the calls then say more
            requests.get(uri.rstrip("/") + "/health", timeout=timeout)
        except requests.RequestException as e:
            raise TrackingUnavailable(f"MLflow server {uri} not reachable within {timeout:g} s "
                                      f"({type(e).__name__})") from None
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _bound(uri: str, timeout: float) -> None:
    """MLflow's own defaults retry a dead server for minutes (7 retries, 120 s timeouts): bounded
    in this process, unless the user set them."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, math.ceil(timeout))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


class Run:
    """One MLflow run that logs until something fails, then warns once and stays quiet. Inactive
    (every call a no-op) when tracking is off. Picklable through ``info()`` / ``attach()``, so Ray
    Train's rank 0 logs its epochs into the run its driver started."""

    def __init__(self, uri: str = "", run_id: str = "", timeout: float = 10.0, warning: str = "",
                 experiment_id: str = "", client_=None):
        self.uri, self.run_id, self.timeout, self.warning = uri, run_id, timeout, warning
        self.experiment_id, self._client = experiment_id, client_

    @property
    def active(self) -> bool:
        return bool(self.run_id) and not self.warning

    def info(self) -> dict | None:
        """What a Ray worker needs to log into this run (None when tracking is off)."""
        return {"uri": self.uri, "run_id": self.run_id, "timeout": self.timeout} if self.active else None

    @classmethod
    def attach(cls, info: dict | None) -> Run:
        """The run ``info()`` describes, on another process (no new run, no server check)."""
        return cls(info["uri"], info["run_id"], info["timeout"]) if info else cls()

    def summary(self) -> str:
        """A line for the job's summary: where the run is, or why tracking stopped."""
        if self.warning:
            return f"tracking: off ({self.warning}); the job went on without it"
        return f"tracking: MLflow run {self.run_id} at {self.uri}" if self.run_id else ""

    def _call(self, what: str, method: str, *args, **kwargs):
        if not self.active:
            return None
        try:
            if self._client is None:  # attached in another process (a Ray Train worker)
                from mlflow import MlflowClient

                _bound(store_uri(self.uri), self.timeout)
                self._client = MlflowClient(tracking_uri=store_uri(self.uri), registry_uri=store_uri(self.uri))
            return getattr(self._client, method)(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking never fails a job
            self.off(f"{what} failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            return None

    def off(self, why: str) -> None:
        if not self.warning:
            self.warning = why
            log.warning("MLflow tracking off for the rest of this job: %s", why)

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per batch
            self._call("logging parameters", "log_batch", self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        if items:
            self._call("logging metrics", "log_batch", self.run_id, metrics=items)

    def set_tags(self, tags: dict) -> None:
        for k, v in tags.items():
            self._call(f"setting tag {k}", "set_tag", self.run_id, k, str(v))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call(f"logging {artifact_file}", "log_text", self.run_id, text, artifact_file)

    def log_folder(self, local_dir: str, artifact_path: str) -> None:
        self._call(f"logging {artifact_path}/", "log_artifacts", self.run_id, local_dir, artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        self._call("ending the run", "set_terminated", self.run_id, status)


def start(cfg: TrackingConfig, experiment: str, name: str, key: tuple[str, str], tags: dict | None = None,
          parent: Run | dict | None = None) -> Run:
    """The run tagged ``key`` in ``experiment`` (made if new), or a new one named ``name``: running,
    with ``tags`` (and as a child of ``parent``). Inactive when ``tracking.uri`` is empty; with a
    warning, and inactive, when the server cannot be reached or refuses."""
    if not cfg.uri:
        return Run()
    run = Run(cfg.uri, timeout=cfg.timeout)
    try:
        c = client(cfg.uri, cfg.timeout)
        exp = c.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else c.create_experiment(experiment)
        parent_id = (parent.get("run_id") if isinstance(parent, dict) else parent.run_id if parent else "") or ""
        found = c.search_runs([exp_id], filter_string=f"tags.`{key[0]}` = '{_quote(key[1])}'", max_results=1)
        all_tags = {key[0]: key[1], **{k: str(v) for k, v in (tags or {}).items()}}
        if parent_id:
            all_tags[PARENT_TAG] = parent_id
        if found:  # a resumed run or sweep: the same MLflow run goes on
            run_id = found[0].info.run_id
            c.update_run(run_id, status="RUNNING")
            for k, v in all_tags.items():
                c.set_tag(run_id, k, v)
        else:
            run_id = c.create_run(exp_id, run_name=name, tags=all_tags).info.run_id
    except Exception as e:  # noqa: BLE001 - tracking never fails a job
        run.off(str(e).splitlines()[0][:300] if str(e) else type(e).__name__)
        return run
    run.run_id, run.experiment_id, run._client = run_id, exp_id, c
    return run


def find(cfg: TrackingConfig, run_id: str) -> Run:
    """An existing run by id (an evaluation logging to its checkpoint's run); inactive where there is
    none on this server, or tracking is off."""
    if not cfg.uri or not run_id:
        return Run()
    try:
        c = client(cfg.uri, cfg.timeout)
        found = c.get_run(run_id)
    except TrackingUnavailable as e:
        return Run(cfg.uri, timeout=cfg.timeout, warning=str(e))
    except Exception:  # noqa: BLE001 - not on this server: the caller starts a run of its own
        return Run()
    return Run(cfg.uri, run_id, cfg.timeout, experiment_id=found.info.experiment_id, client_=c)


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def flat(tree: dict, prefix: str = "") -> dict:
    """A nested config as MLflow parameters: ``{"train": {"lr": 3e-4}}`` -> ``{"train.lr": 3e-4}``."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, dict)) else v
    return out


# --- what each job logs -------------------------------------------------------------------------

def start_training(cfg, run_uri: str, train: list, val: list, classes: list[str], parent: dict | None) -> Run:
    """The MLflow run of a training run (``cfg``: its ``config.Config``), found again by its folder
    when resumed, with the config as parameters; inactive where tracking is off or unreachable."""
    from steelray import config

    run = start(cfg.tracking, cfg.tracking.experiment or f"steelray-{cfg.task}", cfg.ray.run_name,
                key=("steelray.run_uri", run_uri), parent=parent,
                tags={"steelray.job": "train", "steelray.task": cfg.task, "steelray.model": cfg.model.name})
    run.log_params({**flat(config.to_dict(cfg)), "data.train_images": len(train), "data.val_images": len(val),
                    "data.class_names": ",".join(classes)})
    return run


def end_training(run: Run, cfg, result, metric: str, figures: tuple[str, ...]) -> None:
    """After training: the best checkpoint's URI (tag and file), its model card and meta.json, the
    run's config.yaml and metrics.csv as artifacts, its validation ``figures`` (and epoch) as
    ``best_*`` metrics; finished."""
    from steelray import storage

    if not run.active:
        return
    meta = json.loads(storage.read_text(storage.join(result.best_checkpoint, "meta.json"), cfg.s3))
    run.set_tags({"steelray.checkpoint": result.best_checkpoint})
    run.log_metrics({f"best_{k}": v for k, v in result.best_metrics.items() if k in (*figures, "epoch")})
    run.log_text(result.best_checkpoint + "\n", "best_checkpoint.txt")
    run.log_text(model_card(meta, result.best_checkpoint, result.run_uri, metric, figures), "model_card.md")
    run.log_text(json.dumps(meta, indent=1), "checkpoint/meta.json")
    for name in ("config.yaml", "metrics.csv"):
        try:
            run.log_text(storage.read_text(storage.join(result.run_uri, name), cfg.s3), name)
        except FileNotFoundError:
            pass
    run.end("FINISHED")


def model_card(meta: dict, checkpoint: str, run_uri: str, metric: str, figures: tuple[str, ...]) -> str:
    """A short Markdown card: what the model decides, from what, how well (on which images), where
    its checkpoint is, and how to score with it."""
    cfg = meta.get("config", {})
    data, train, pre = cfg.get("data", {}), cfg.get("train", {}), meta.get("preprocess", {})
    shown = ", ".join(f"{k} {v:.4f}" for k, v in meta.get("metrics", {}).items()
                      if k in figures and isinstance(v, float))
    split = (f"fold {data.get('fold')} of {data.get('folds')}" if data.get("folds")
             else f"a {data.get('val_fraction')} validation split (seed {data.get('seed')})")
    return "\n".join([
        f"# {meta.get('model', {}).get('name')} ({meta.get('task')})", "",
        f"- Classes: {', '.join(map(str, meta.get('classes', [])))}; thresholds {meta.get('thresholds')}",
        f"- Input: {pre.get('in_chans')} channel(s) at {pre.get('size')} (normalise: {pre.get('normalize', 'dataset')})",
        f"- Data: {data.get('format')} at {data.get('root')}; validated on {split}",
        f"- Training: {train.get('epochs')} epochs, lr {train.get('lr')}, batch {train.get('batch_size')}, "
        f"augment {cfg.get('input', {}).get('augment')}, kept the {train.get('keep', 'best')} epoch "
        f"(epoch {meta.get('epoch')})",
        f"- Validation ({metric} chose the epoch, so these figures flatter it): {shown}",
        f"- Checkpoint: `{checkpoint}` (run folder `{run_uri}`)", "",
        f"Score with it: `python jobs/score.py --checkpoint {checkpoint} --input ... --output ...`", ""])


def start_sweep(cfg, sweep_uri: str, name: str, metric: str) -> Run:
    """A sweep's parent run (found again by the sweep's folder when it resumes): the base config and
    the search space as parameters. Each trial's training run is its child."""
    from steelray import config

    run = start(cfg.tracking, cfg.tracking.experiment or f"steelray-{cfg.task}", name,
                key=("steelray.sweep_uri", sweep_uri), tags={"steelray.job": "sweep", "steelray.task": cfg.task,
                                                             "steelray.metric": metric})
    base = {k: v for k, v in config.to_dict(cfg).items() if k != "tune"}
    run.log_params({**flat(base), "tune.space": json.dumps(cfg.tune.space), "tune.search": cfg.tune.search,
                    "tune.scheduler": cfg.tune.scheduler})
    return run


STATUS = {"completed": "FINISHED", "stopped early": "KILLED", "failed": "FAILED"}


def end_sweep(run: Run, trials, metric: str, sweep_uri: str, files: dict[str, str]) -> None:
    """After a sweep: each trial's child run gets its status (completed, stopped early, failed: MLflow
    FINISHED, KILLED, FAILED), its best metric and epoch; the parent the table and best config."""
    if not run.active:
        return
    for row in trials.to_dict("records"):
        child = _child(run, f"{sweep_uri}/train/{row['trial_id']}")
        if child is None:
            continue
        child.set_tags({"steelray.trial_id": row["trial_id"], "steelray.status": row["status"],
                        **({"steelray.error": row["error"][:5000]} if row.get("error") else {})})
        child.log_metrics({f"best_{metric}": row.get(metric), "best_epoch": row.get("best_epoch")})
        child.end(STATUS.get(row["status"], "FINISHED"))
    done = trials[trials["status"] != "failed"].dropna(subset=[metric])
    if not done.empty:
        best = done.sort_values(metric, ascending=metric.endswith("loss"), kind="stable").iloc[0]
        run.log_metrics({f"best_{metric}": best[metric]})
        run.set_tags({"steelray.best_trial": best["trial_id"], "steelray.checkpoint": best["checkpoint"]})
    run.log_metrics({"trials": len(trials), "trials_failed": int((trials["status"] == "failed").sum())})
    for name, text in files.items():
        run.log_text(text, name)
    run.end("FINISHED" if not done.empty else "FAILED")


def _child(parent: Run, run_uri: str) -> Run | None:
    found = parent._call("finding a trial's run", "search_runs", [parent.experiment_id],
                         filter_string=f"tags.`steelray.run_uri` = '{_quote(run_uri)}'", max_results=1)
    if not found:
        return None
    return Run(parent.uri, found[0].info.run_id, parent.timeout, client_=parent._client)


def log_evaluation(cfg: TrackingConfig, meta: dict, checkpoint: str, files: dict[str, str], metrics: dict,
                   thresholds: dict, label: str) -> Run:
    """An evaluation into the run that trained its checkpoint (``meta``'s ``mlflow_run_id``, where
    that run is on this server), else into a run of its own: ``metrics.json``, ``report.html`` and
    the calibrated thresholds under ``evaluation/<label>/``, its figures as ``eval_<label>_*``."""
    run = find(cfg, meta.get("mlflow_run_id", ""))
    if not run.active and not run.warning:
        run = start(cfg, cfg.experiment or f"steelray-{meta.get('task')}", f"evaluate {checkpoint.rstrip('/')[-60:]}",
                    key=("steelray.evaluated", checkpoint), tags={"steelray.job": "evaluate",
                                                                 "steelray.checkpoint": checkpoint})
    for name, text in files.items():
        run.log_text(text, f"evaluation/{label}/{name}")
    run.log_text(json.dumps(thresholds, indent=1), f"evaluation/{label}/thresholds.json")
    run.log_metrics({f"eval_{label}_{k}": v for k, v in metrics.items()})
    if not meta.get("mlflow_run_id") or run.run_id != meta.get("mlflow_run_id"):
        run.end("FINISHED")
    return run
