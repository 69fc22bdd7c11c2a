"""The nightly scoring job: ``run(job)`` lists the inputs, holds the output for its model version,
drops what is already done, streams the rest through Ray Data (CPU decode tasks, a pool of model
actors, the atomic Parquet sink), reads the output back and sums up.

    summary = run(config.load(None, ["score.input=s3://plant/incoming/2026-11-22/",
                                     "score.checkpoint=s3://models/neu/best",
                                     "score.output=s3://plant/predictions/"], config.ScoreJob))

Nothing lost, nothing twice: every input becomes one row (a prediction or an ``error``); a rerun
skips what the output holds for the same model version; with ``score.retry_errors`` those inputs'
error rows are removed first and they are scored again (a job killed in between leaves them
missing, which its rerun scores, never twice); after the write the output is read back and the job
fails if any input is missing or duplicated.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace

import pyarrow as pa
import pyarrow.compute as pc

from steelray import cluster, registry, storage
from steelray.config import ScoreConfig, ScoreJob
from steelray.scoring import output
from steelray.scoring.actor import ActorSettings, Scorer
from steelray.scoring.compiled import use_compile
from steelray.scoring.decode import read_and_decode, task_memory
from steelray.scoring.inputs import expand_input, list_inputs, night
from steelray.scoring.lock import RunLock
from steelray.scoring.plan import Plan, ScoreError, file_tag, make_plan
from steelray.storage import S3Config

log = logging.getLogger(__name__)


@dataclass
class Summary:
    inputs: int
    skipped: int                  # already in the output for this checkpoint
    scored: int                   # new rows with a prediction
    errored: int                  # new rows with an error
    gate_skipped: int             # cascade: scored sheets the classifier did not flag
    seconds: float
    output: str                   # the run-date partition written to
    model: str
    checkpoint: str
    errors: list[str] = field(default_factory=list)  # the first few error messages
    retried: int = 0              # error rows removed to score their inputs again (score.retry_errors)
    device: str = ""              # where the model actors ran ("": nothing to score)
    actors: int = 0               # model actors started (a restarted one counts once)
    actor_nodes: int = 0          # nodes they were on at the end
    actor_restarts: int = 0       # restarts after a lost node or a crashed actor

    @property
    def images_per_s(self) -> float:
        done = self.scored + self.errored
        return done / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        out = [f"inputs {self.inputs}: scored {self.scored}, errors {self.errored}, "
               f"skipped (already scored) {self.skipped}"
               + (f"; {self.retried} input(s) with an error row scored again" if self.retried else ""),
               f"{self.images_per_s:.1f} images/s over {self.seconds:.1f} s with {self.model} "
               f"(checkpoint {self.checkpoint})"]
        if self.actors:
            out.append(f"model actors: {self.actors} on {self.device} over {self.actor_nodes} node(s)"
                       + (f", restarted {self.actor_restarts} time(s)" if self.actor_restarts else ""))
        if self.gate_skipped:
            out.append(f"cascade: the classifier passed {self.gate_skipped} sheet(s) without segmenting them")
        out += [f"error: {e}" for e in self.errors]
        out.append(f"output: {self.output}")
        return out

    def write(self, root: str, s3: S3Config | None) -> str:
        """The summary as JSON under ``<root>/_runs/`` (readers of the predictions skip ``_`` folders),
        one file per finished job, for whatever watches the nightly runs; returns its URI."""
        finished = dt.datetime.now(dt.timezone.utc)
        uri = storage.join(root, "_runs", f"{finished:%Y-%m-%dT%H%M%S.%fZ}-{file_tag(self.checkpoint)}.json")
        body = {**asdict(self), "images_per_s": round(self.images_per_s, 2), "finished": finished.isoformat()}
        storage.write_atomic(uri, json.dumps(body, indent=1).encode(), s3)
        return uri


def run(job: ScoreJob) -> Summary:
    """Score ``job.score.input`` into ``job.score.output``; raises ScoreError (bad input or
    checkpoint), ``lock.OutputBusy`` (another job holds the output) or ``output.VerificationError``;
    for a ``models:/`` checkpoint ``registry.RegistryError`` or ``tracking.TrackingUnavailable``."""
    sc, s3 = job.score, job.s3
    if not sc.output:
        raise ScoreError("score.output: required (a folder or s3:// prefix for the Parquet dataset)")
    date = night(sc)
    sc = replace(sc, run_date=date.isoformat(), input=expand_input(sc.input, date),
                 checkpoint=registry.resolve(sc.checkpoint, job.tracking, s3),  # models:/<name>@<alias>
                 segmenter=registry.resolve(sc.segmenter, job.tracking, s3))
    plan = make_plan(sc, s3)
    run_date = sc.run_date
    partition = storage.join(sc.output, f"run_date={run_date}")
    start = time.monotonic()
    out_root = storage.absolute(sc.output).rstrip("/") + "/"
    inputs = [(i, u) for i, u in list_inputs(sc, s3) if not u.startswith(out_root)]  # output inside input
    cluster.check_shared([("score.output", sc.output), ("score.compile_cache", sc.compile_cache)]
                         + [("score.input", u) for _, u in inputs], sc.shared_paths, sc.address, "score.shared_paths")
    # score.lock_ttl=0: the user makes sure that one job at a time writes this output
    lock = (RunLock(sc.output, file_tag(plan.digest), s3, ttl=sc.lock_ttl, what=f"{plan.model_name} on {sc.input}")
            if sc.lock_ttl else contextlib.nullcontext())
    with lock:
        summary = _score(plan, sc, s3, inputs, partition, start)
    try:
        summary.write(sc.output, s3)
    except Exception as e:  # noqa: BLE001 - the predictions are complete and verified; this is a report
        log.warning("could not write the run summary under %s/_runs: %s: %s", sc.output, type(e).__name__, e)
    return summary


def _score(plan: Plan, sc: ScoreConfig, s3: S3Config | None, inputs: list[tuple[str, str]], partition: str,
           start: float) -> Summary:
    """``run`` once this job holds the output for its model version."""
    import ray

    dataset = output.open_output(sc.output, s3)
    output.check_family(dataset, sc.output, plan.schema())
    before = output.rows_for(dataset, sc.output, plan.digest, [u for _, u in inputs], s3)
    retried = 0
    if sc.retry_errors:
        failed = before.filter(pc.is_valid(before.column("error")))
        before = before.filter(pc.is_null(before.column("error")))
        # Removed before they are scored again: a job killed in between leaves these inputs missing,
        # which its rerun scores like any other, never an input with two rows.
        retried = output.drop_rows(plan.digest, failed, s3, sc.retries) if failed.num_rows else 0
    done = set(before.column("source_uri").to_pylist())
    todo = [(i, u) for i, u in inputs if u not in done]
    skipped = len(inputs) - len(todo)
    print(f"score: {len(inputs)} input(s), {skipped} already scored by {plan.model_name} "
          f"({plan.digest}), {len(todo)} to score into {partition}"
          + (f" ({retried} with an error row, removed to score them again)" if retried else ""), flush=True)
    removed = output.remove_stale_temporaries(partition, plan.digest)
    if removed:
        log.warning("%s: removed %d unfinished file(s) left by an interrupted run", partition, removed)
    place, actors = None, {}
    if todo:
        if not ray.is_initialized():
            ray.init(address=sc.address or None)
        place, actors = _pipeline(plan, sc, s3, todo, partition)
    rows = output.verify(sc.output, plan.digest, plan.schema(), [u for _, u in inputs], s3)
    new = rows.filter(pc.is_in(rows.column("source_uri"), pa.array([u for _, u in todo], pa.string())))
    err = new.column("error").to_pylist()
    errors = [e for e in err if e is not None]
    gate_skipped = 0
    if plan.cascade and new.num_rows:
        gate_skipped = sum(1 for f, e in zip(new.column("flagged").to_pylist(), err) if e is None and f is False)
    return Summary(inputs=len(inputs), skipped=skipped, scored=len(err) - len(errors), errored=len(errors),
                   gate_skipped=gate_skipped, seconds=time.monotonic() - start, output=partition,
                   model=plan.model_name, checkpoint=plan.digest, errors=errors[:10], retried=retried,
                   device=place.device if place else "", actors=len(actors),
                   actor_nodes=len({a["node"] for a in actors.values()}),
                   actor_restarts=sum(a["restarts"] for a in actors.values()))


@dataclass(frozen=True)
class Placement:
    """Where the model actors run: their device, the pool's bounds and the actors it starts with."""

    device: str
    least: int
    most: int | None   # None: no limit (an autoscaler without one)
    initial: int

    def shape(self, sc: ScoreConfig) -> dict[str, float]:
        """The resources one model actor holds."""
        return {"CPU": sc.actor_cpus, **({"GPU": sc.actor_gpus} if self.device == "cuda" else {})}


def placement(sc: ScoreConfig, cap: cluster.Capacity) -> Placement:
    """The model actors' device and pool size on a cluster of Capacity ``cap``. ``auto`` means GPU
    where the cluster has GPUs or its autoscaler can start GPU nodes (at night the GPU nodes are
    often all down until a job asks for them). The pool grows from 1 to ``score.max_actors``, by
    default what the cluster at its largest holds; it starts with what fits on the nodes up now."""
    device = sc.device if sc.device != "auto" else ("cuda" if cap.most("GPU") else "cpu")
    if sc.actors:
        return Placement(device, sc.actors, sc.actors, sc.actors)
    if device == "cuda":
        per, now, most = sc.actor_gpus, cap.now("GPU"), cap.most("GPU")
    else:  # a decode task's CPU beside each actor's, so that a pool on CPU does not starve its own input
        per, now, most = sc.actor_cpus + 1, cap.now("CPU"), cap.most("CPU")
    limit = sc.max_actors or (None if math.isinf(most) else max(1, int(most / per + 1e-9)))
    fit_now = max(1, int(now / per + 1e-9))
    return Placement(device, 1, limit, fit_now if limit is None else min(fit_now, limit))


def model_batch(sc: ScoreConfig, device: str) -> int:
    """Images per model call: ``score.batch_size``, else 256 on GPU and 16 on CPU (a GPU too small
    for a batch runs it in halves: ``Scorer.probabilities``)."""
    return sc.batch_size or (256 if device == "cuda" else 16)


def actor_calls(sc: ScoreConfig, device: str) -> int:
    """Batches a model actor takes at once: ``score.actor_calls``, else 4 on GPU, 1 on CPU. Above 1,
    Ray Data fetches and stitches an actor's next batches while its model runs on the current one;
    on CPU the model and that work share the same cores, so one at a time."""
    return sc.actor_calls or (4 if device == "cuda" else 1)


def _pipeline(plan: Plan, sc: ScoreConfig, s3: S3Config | None, todo: list[tuple[str, str]],
              partition: str) -> tuple[Placement, dict]:
    """Stream ``todo`` through decode tasks, the model actors and the sink; returns the placement
    and this job's new model actors (``_scorer_actors``)."""
    import ray
    from ray.data import ActorPoolStrategy

    cap = cluster.capacity()
    place = placement(sc, cap)
    device = place.device
    batch, calls = model_batch(sc, device), actor_calls(sc, device)
    memory = task_memory(plan.inputs, plan.expect_size, sc.decode_batch, any(u.startswith("s3://") for _, u in todo))
    _check_room(sc, cap, place, {"CPU": 1.0, "memory": float(memory)})
    settings = ActorSettings(device=device, threads=sc.actor_threads or max(1, int(sc.actor_cpus)),
                             precision=sc.precision,
                             compile=sc.engine == "torch" and use_compile(sc, device, len(todo), place.initial),
                             batch=batch, compile_cache=sc.compile_cache, s3=s3)
    log.info("scoring %d images on %s model actor(s) (%d at first, at most %s), batch %d, %d batch(es) per "
             "actor at once, %s", len(todo), device, place.initial, place.most or "no limit", batch, calls,
             "ONNX Runtime" if sc.engine == "onnxruntime" else "compiled" if settings.compile else "not compiled")
    before = _scorer_actors()
    ds = ray.data.from_items([{"image_id": i, "source_uri": u} for i, u in todo],
                             override_num_blocks=max(1, math.ceil(len(todo) / sc.decode_batch)))
    ds = ds.map_batches(read_and_decode, batch_size=sc.decode_batch, batch_format="numpy", memory=memory,
                        fn_kwargs={"inputs": [p.to_dict() for p in plan.inputs], "expect_size": plan.expect_size,
                                   "s3": s3, "retries": sc.retries, "threads": sc.read_threads})
    ds = ds.map_batches(Scorer, batch_size=batch, batch_format="numpy",
                        fn_constructor_kwargs={"plan": plan, "settings": settings},
                        compute=ActorPoolStrategy(min_size=place.least, max_size=place.most,
                                                  initial_size=place.initial,
                                                  max_concurrent_calls_per_actor=calls,
                                                  enable_true_multi_threading=False),
                        num_cpus=sc.actor_cpus, num_gpus=sc.actor_gpus if device == "cuda" else 0)
    ds.write_datasink(output.ParquetSink(partition, s3, sc.rows_per_file, sc.retries))
    actors = _scorer_actors()
    return place, ({k: v for k, v in actors.items() if k not in before} if actors is not None else {})


def _check_room(sc: ScoreConfig, cap: cluster.Capacity, place: Placement, decode: dict[str, float]) -> None:
    """Fail at once where the cluster cannot hold a model actor and a decode task at the same time
    and no autoscaler can add a node that would (Ray Data would wait for ever, backpressured);
    where one can, say that the job waits for it."""
    need = [place.shape(sc), decode]
    if cluster.fits(list(cap.nodes), need):
        return
    wanted = (f"a model actor {cluster.shape_text(need[0])} and a decode task {cluster.shape_text(decode)} "
              f"at once")
    if cap.types and cluster.fits(list(cap.nodes) + [t for t, _ in cap.types], need):
        print(f"score: the nodes up now cannot hold {wanted}; waiting for the autoscaler to start a node "
              f"({cluster.growth(cap.types)})", flush=True)
        return
    raise ScoreError(f"the Ray cluster is too small for the scoring pipeline: it needs {wanted}, and its nodes "
                     f"are {cluster.describe(cap.nodes)}"
                     + (f", with an autoscaler that can add {cluster.growth(cap.types)}" if cap.types
                        else ", with no autoscaler to add any")
                     + ". Add a node, or lower score.actor_cpus (or score.decode_batch, for the memory)"
                     + (", or score.device=cpu" if place.device == "cuda" else ""))


def _scorer_actors() -> dict[str, dict] | None:
    """This job's model actors so far, alive or dead, by id: their node and restarts (Ray's state
    API; None where it cannot be reached, e.g. a cluster without the dashboard)."""
    import ray
    from ray.util.state import list_actors

    try:
        context = ray.get_runtime_context()  # its address: with several Rays on a machine, "auto" may pick another
        found = list_actors(address=context.gcs_address, filters=[("job_id", "=", context.get_job_id())],
                            detail=True, limit=10_000, raise_on_missing_output=False)
    except Exception as e:  # noqa: BLE001 - the summary goes without the actor tally
        log.info("could not list the model actors: %s: %s", type(e).__name__, e)
        return None
    return {a.actor_id: {"node": a.node_id, "restarts": a.num_restarts or 0}
            for a in found if "Scorer" in (a.class_name or "")}
