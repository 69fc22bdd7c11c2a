"""The configs of the jobs around training: scoring, synthetic data, evaluation, export and the
morning report. Each ``*Job`` is a whole job's config, loaded by ``config.load(path, overrides, cls)``
(which re-exports them); its ``check`` holds the rules that involve more than one field.
"""

from __future__ import annotations

import zoneinfo
from dataclasses import dataclass, field
from typing import Any, Literal

from steelray.config_loader import ConfigError, is_date, setting
from steelray.storage import S3Config
from steelray.tracking import TrackingConfig


@dataclass
class ScoreConfig:
    """The nightly scoring job (``jobs/score.py``): what to score, with which checkpoint(s), where to."""

    input: str = ""                # folder / s3:// prefix of images, a manifest file (.txt, .csv) of URIs, or one image
    checkpoint: str = ""           # classifier or segmenter checkpoint folder (local or s3://), an ensemble
                                   # folder (jobs/ensemble.py), or with engine onnxruntime an exported .onnx
    engine: Literal["torch", "onnxruntime"] = "torch"  # onnxruntime: the model actors run exported
                                   # models (CPU; CUDA where the onnxruntime build has it); no compile
    tta: Literal["none", "flips", "dihedral"] = "none"  # test-time augmentation: probabilities averaged
                                   # over flipped views (dihedral: and 90-degree turns, square inputs); a version of its own
    segmenter: str = ""            # with a classifier checkpoint: cascade, only flagged sheets get segmented
    output: str = ""               # Parquet dataset root (local or s3://), partitioned by run_date
    run_date: str = ""             # the night (YYYY-MM-DD): its partition, and {run_date} in input (e.g.
                                   # s3://plant/incoming/{run_date}/, {run_date:%Y/%m/%d}); empty: today
    run_date_offset: int = 0       # days added to today where run_date is empty: -1 for last night's folder
    run_timezone: str = "UTC"      # the IANA time zone "today" is taken in (the plant's, e.g. Europe/Berlin)
    suffixes: list[str] = setting([])   # only files ending so (e.g. [.jpg]); empty: every file is an input
    expect_size: list[int] = setting([])  # [height, width] every sheet must have; empty: 256x1600 for
                                   # checkpoints trained on Severstal, any size otherwise
    min_area: list[int] = setting([])   # per class, segmenters: smaller masks are dropped; empty: checkpoint's, else 0
    batch_size: int = setting(0, min=0)       # images per model call; 0: 256 on GPU (where a batch does
                                         # not fit in GPU memory the actor halves it, logged), 16 on CPU
    actors: int = setting(0, min=0)           # a fixed number of model actors; 0: a pool that grows with the
                                   # cluster, from 1 to max_actors, starting with what fits now
    max_actors: int = setting(0, min=0)       # the pool's limit; 0: what the cluster can grow to (its
                                   # autoscaler's node types): one per actor_gpus of each GPU, on CPU
                                   # one per actor_cpus + 1 (a decode task's CPU) of each CPU
    actor_gpus: float = setting(1.0, min=0.05, max=1.0)  # GPU share per actor: 0.5 puts two actors on each GPU
    actor_cpus: float = setting(1.0, min=0.0)  # CPUs reserved per actor (leave some for decoding)
    actor_threads: int = setting(0, min=0)    # torch threads per actor; 0: max(1, actor_cpus)
    actor_calls: int = setting(0, min=0)      # batches an actor takes at once: above 1, Ray Data fetches and
                                   # stitches the next batches while the model runs (the model still runs
                                   # one batch at a time); 0: 4 on GPU, 1 on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when the cluster has GPUs or its
                                   # autoscaler can start GPU nodes
    compile: Literal["auto", True, False] = "auto"  # torch.compile the model(s) in each actor: a compile
                                   # at start, then a faster model; auto: where each actor has enough
                                   # images to win that back. Where compiling fails, the actor warns, runs eager
    compile_cache: str = ""        # folder (local or s3://) for torch's compile cache, per model version,
                                   # device kind and torch: actors on fresh nodes load it instead of
                                   # compiling everything again; empty: off
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16"] = "auto"  # auto: bf16-mixed on GPU, fp32 on
                                   # CPU; bf16-mixed: autocast; bf16: weights and inputs in bfloat16
    decode_batch: int = setting(32, min=1)    # images per read+decode task
    read_threads: int = setting(8, min=1)     # concurrent reads per decode task (S3 latency)
    rows_per_file: int = setting(1000, min=1)  # rows per Parquet file (at least; the last may be smaller)
    retries: int = setting(5, min=0)          # S3 attempts beyond the first, with exponential backoff
    retry_errors: bool = False     # score again the inputs whose row for this checkpoint is an error
                                   # (an S3 outage, a file fixed in place); the error row is replaced
    lock_ttl: int = setting(300, min=0)       # seconds: one job per output and model version at a time;
                                   # another job's lock counts as abandoned when its process has ended
                                   # (same host) or it has not renewed it for this long; 0: no lock
    address: str = ""              # Ray cluster; empty: the running one, or a local one
    shared_paths: list[str] = setting([])  # local folders every node of the cluster mounts (NFS, EFS...);
                                   # other local inputs and outputs are refused on more than one node


@dataclass
class ScoreJob:
    score: ScoreConfig = field(default_factory=ScoreConfig)
    s3: S3Config = field(default_factory=S3Config)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # models:/ checkpoints

    def check(self) -> None:
        sc = self.score
        if sc.expect_size and (len(sc.expect_size) != 2 or min(sc.expect_size) < 1):
            raise ConfigError(f"score.expect_size: expected [height, width], got {sc.expect_size}")
        if any(a < 0 for a in sc.min_area):
            raise ConfigError(f"score.min_area: must be >= 0 per class, got {sc.min_area}")
        if sc.run_date and not is_date(sc.run_date):
            raise ConfigError(f"score.run_date: expected YYYY-MM-DD, got {sc.run_date!r}")
        try:
            zoneinfo.ZoneInfo(sc.run_timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"score.run_timezone: {sc.run_timezone!r} is not an IANA time zone "
                              "(e.g. UTC, Europe/Berlin)") from None


@dataclass
class SynthConfig:
    """A synthetic data set (``jobs/make_data.py``): Severstal-format sheets or NEU images."""

    format: Literal["severstal", "neu"] = "severstal"
    out: str = ""                  # folder or s3:// prefix
    n: int = setting(100, min=1)        # severstal: sheets; neu: images per class
    seed: int = 0                  # same seed, same images
    defect_free_share: float = setting(0.47, min=0.0, max=1.0)  # severstal: sheets without defects
    class_freq: list[float] = setting([0.13, 0.035, 0.72, 0.115], min=0.0)  # severstal: classes 1-4 among defects
    multi_share: float = setting(0.06, min=0.0, max=1.0)  # severstal: defective sheets with a second class
    workers: int = setting(0, min=0)    # processes; 0: the CPU count, at most 8
    montage: str = ""              # also a PNG montage of the first images, here


@dataclass
class SynthJob:
    synth: SynthConfig = field(default_factory=SynthConfig)
    s3: S3Config = field(default_factory=S3Config)

    def check(self) -> None:
        if len(self.synth.class_freq) != 4 or not sum(self.synth.class_freq) > 0:
            raise ConfigError(f"synth.class_freq: 4 relative frequencies (classes 1-4), not all 0; "
                              f"got {self.synth.class_freq}")


@dataclass
class EvaluateConfig:
    """Evaluating a checkpoint on a labelled set (``jobs/evaluate.py``)."""

    checkpoint: str = ""           # checkpoint folder or s3:// prefix, an exported .onnx, or an ensemble folder
    split: Literal["val", "all"] = "val"  # val: the training run's validation split; all: every image
    min_recall: dict[str, float] = setting({})  # class -> recall its calibrated threshold must keep
    robustness: bool = True        # also under glare, dimming, under-exposure, blur and noise
    tta: Literal["none", "flips", "dihedral"] = "none"  # as score.tta: evaluate the model as it will be scored
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = setting(32, min=1)
    loader_workers: int = setting(0, min=0)
    limit: int = setting(0, min=0)      # > 0: the first N images only (quick looks)
    out: str = ""                  # report folder; empty: reports/<model>-<checkpoint folder name>
    write_thresholds: bool = False  # store the calibrated thresholds in the checkpoint (scoring uses them)


@dataclass
class EvaluateJob:
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    data: dict[str, Any] = setting({})  # data.* settings of the labelled set over the checkpoint's own (empty:
                                   # its training data); any other root means all of that set's images
    s3: S3Config = field(default_factory=S3Config)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # models:/ checkpoints


@dataclass
class ExportConfig:
    """A checkpoint to ONNX and INT8 for CPU scoring and the line (``jobs/export.py``)."""

    checkpoint: str = ""           # checkpoint folder or s3:// prefix
    out: str = ""                  # folder for model.onnx, model.int8.onnx, export.json; empty: <checkpoint>/export
    tolerance: float = setting(1e-4, min=0.0)  # parity: largest probability difference from PyTorch allowed
    parity_images: int = setting(32, min=1)    # validation-split images the parity check runs on
    int8: bool = True              # also a static INT8 (QDQ) model, gated on accuracy
    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"  # how activation ranges are chosen
    calibration_images: int = setting(128, min=1)  # training-split images, drawn at random (seed)
    max_drop: float = setting(0.005, min=0.0, max=1.0)  # gate: INT8's macro-F1 (Dice) at most this below PyTorch's
    batch_size: int = setting(16, min=1)
    seed: int = 0


@dataclass
class ExportJob:
    export: ExportConfig = field(default_factory=ExportConfig)
    data: dict[str, Any] = setting({})  # data.* of the images used (as evaluate's): the checkpoint's own splits
    s3: S3Config = field(default_factory=S3Config)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # models:/ checkpoints


@dataclass
class NightReportConfig:
    """The morning report over one night of a scoring output (``jobs/night_report.py``)."""

    output: str = ""               # the scoring output's root (score.output), local or s3://
    night: str = ""                # its run_date, YYYY-MM-DD; empty: the newest night there
    nights: int = setting(7, min=0, max=366)  # nights before it (those in the output) for trends and reference
    version: str = ""              # model version (the output's checkpoint column); empty: tonight's most rows
    checkpoint: str = ""           # or the checkpoint folder itself: its version, and its validation
                                   # predictions (kept by jobs/evaluate.py) as the reference for drift
    candidate: str = ""            # a second version (or checkpoint folder) compared on the same sheets
    reference: Literal["auto", "validation", "nights"] = "auto"  # probabilities' drift reference;
                                   # auto: validation where the checkpoint has it, else the nights before
    max_ks: float = setting(0.2, min=0.0, max=1.0)  # drift flag: KS statistic at least this ...
    max_p: float = setting(0.001, min=0.0, max=1.0)  # ... and p-value below this (drift.py)
    max_error_rate: float = setting(0.02, min=0.0, max=1.0)  # error rows past this share of the night alert
    gallery: int = setting(6, min=0, max=48)  # most confident sheets per class (and disagreements) shown
    review: int = setting(100, min=0)  # sheets nearest the decision threshold in review.csv
    out: str = ""                  # folder for report.html/.json and review.csv; empty: <output>/_reports/<night>-<version>


@dataclass
class NightReportJob:
    report: NightReportConfig = field(default_factory=NightReportConfig)
    s3: S3Config = field(default_factory=S3Config)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # models:/ checkpoints

    def check(self) -> None:
        if self.report.night and not is_date(self.report.night):
            raise ConfigError(f"report.night: expected YYYY-MM-DD, got {self.report.night!r}")
