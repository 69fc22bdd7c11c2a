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
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from steelray import cluster, storage
from steelray.config import ScoreConfig, ScoreJob
from steelray.scoring import output
from steelray.scoring.actor import ActorSettings, Scorer
from steelray.scoring.compiled import use_compile
from steelray.scoring.decode import read_and_decode, task_memory
from steelray.scoring.inputs import list_inputs
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
    checkpoint), ``lock.OutputBusy`` (another job holds the output) or ``output.VerificationError``."""
    sc, s3 = job.score, job.s3
    if not sc.output:
        raise ScoreError("score.output: required (a folder or s3:// prefix for the Parquet dataset)")
    plan = make_plan(sc, s3)
    run_date = sc.run_date or dt.datetime.now(dt.timezone.utc).date().isoformat()
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
    if todo:
        if not ray.is_initialized():
            ray.init(address=sc.address or None)
        _pipeline(plan, sc, s3, todo, partition)
    rows = output.verify(sc.output, plan.digest, plan.schema(), [u for _, u in inputs], s3)
    new = rows.filter(pc.is_in(rows.column("source_uri"), pa.array([u for _, u in todo], pa.string())))
    err = new.column("error").to_pylist()
    errors = [e for e in err if e is not None]
    gate_skipped = 0
    if plan.cascade and new.num_rows:
        gate_skipped = sum(1 for f, e in zip(new.column("flagged").to_pylist(), err) if e is None and f is False)
    return Summary(inputs=len(inputs), skipped=skipped, scored=len(err) - len(errors), errored=len(errors),
                   gate_skipped=gate_skipped, seconds=time.monotonic() - start, output=partition,
                   model=plan.model_name, checkpoint=plan.digest, errors=errors[:10], retried=retried)


def placement(sc: ScoreConfig, gpus: float) -> tuple[str, int]:
    """The model actors' device and how many there are, for a cluster with ``gpus`` GPUs."""
    device = sc.device if sc.device != "auto" else ("cuda" if gpus else "cpu")
    if sc.actors:
        return device, sc.actors
    return device, (max(1, int(gpus / sc.actor_gpus + 1e-9)) if device == "cuda" else 1)


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
              partition: str) -> None:
    import ray
    from ray.data import ActorPoolStrategy

    device, actors = placement(sc, ray.cluster_resources().get("GPU", 0))
    batch, calls = model_batch(sc, device), actor_calls(sc, device)
    settings = ActorSettings(device=device, threads=sc.actor_threads or max(1, int(sc.actor_cpus)),
                             precision=sc.precision, compile=use_compile(sc, device, len(todo), actors),
                             batch=batch, compile_cache=sc.compile_cache, s3=s3)
    log.info("scoring %d images on %d %s actor(s), batch %d, %d batch(es) per actor at once, %s", len(todo),
             actors, device, batch, calls, "compiled" if settings.compile else "not compiled")
    ds = ray.data.from_items([{"image_id": i, "source_uri": u} for i, u in todo],
                             override_num_blocks=max(1, math.ceil(len(todo) / sc.decode_batch)))
    ds = ds.map_batches(read_and_decode, batch_size=sc.decode_batch, batch_format="numpy",
                        memory=task_memory(plan.inputs, plan.expect_size, sc.decode_batch,
                                           any(u.startswith("s3://") for _, u in todo)),
                        fn_kwargs={"inputs": [p.to_dict() for p in plan.inputs], "expect_size": plan.expect_size,
                                   "s3": s3, "retries": sc.retries, "threads": sc.read_threads})
    ds = ds.map_batches(Scorer, batch_size=batch, batch_format="numpy",
                        fn_constructor_kwargs={"plan": plan, "settings": settings},
                        compute=ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=calls,
                                                  enable_true_multi_threading=False),
                        num_cpus=sc.actor_cpus, num_gpus=sc.actor_gpus if device == "cuda" else 0)
    ds.write_datasink(output.ParquetSink(partition, s3, sc.rows_per_file, sc.retries))
