"""One typed config tree for every job: dataclasses, loaded from YAML, overridden from the command line.

    cfg = config.load("jobs/configs/neu.yaml", ["train.lr=3e-4", "data.root=s3://bucket/neu"])

Every value is checked before any work starts: an unknown key names the valid keys, a wrong type
names the expected type, a value out of range or not among the choices says which are allowed.
The loader's mechanics (overrides, types, ranges) are in ``steelray.config_loader``.
"""

from __future__ import annotations

import zoneinfo
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import yaml

from steelray import storage
from steelray.config_loader import (SECRET_MASK, ConfigError, apply_override, build, coerce, is_date,  # noqa: F401
                                     setting, to_dict)
from steelray.storage import S3Config
from steelray.tracking import TrackingConfig

Task = Literal["binary", "multilabel", "multiclass", "segmentation"]


@dataclass
class DataConfig:
    """Where the labelled images are and how to read them into a manifest."""

    format: Literal["severstal", "neu", "csv"] = "severstal"
    root: str = ""                 # local folder or s3:// prefix of the data set
    labels_csv: str = ""           # relative to root; severstal: train.csv; neu: optional; csv: required
    images_dir: str = ""           # relative to root; severstal: train_images; neu: images/ if present
    image_column: str = "image"    # csv: column with the image path (relative to images_dir) or URI
    label_columns: list[str] = setting(["label"])  # csv: one column of class names, or one 0/1 column per class
    label_separator: str = ""      # csv: separator for several class names in one cell (e.g. "|")
    group_column: str = ""         # csv: rows sharing this value (a coil, a camera run) share a split
    classes: list[str] = setting([])    # empty: the format's own (severstal 1..4, the six NEU classes)
    in_chans: int = setting(1, min=1, max=3)
    verify_images: bool = True     # decode every image while building the manifest
    on_bad_input: Literal["fail", "drop"] = "fail"
    val_fraction: float = setting(0.2, min=0.01, max=0.9)
    folds: int = setting(0, min=0)      # >= 2: k-fold split, ``fold`` picks the validation fold
    fold: int = setting(0, min=0)
    seed: int = 0
    limit: int = setting(0, min=0)      # > 0: use only the first N images (quick runs)


@dataclass
class ModelConfig:
    """The network. Classifiers: a timm name or ``simple_cnn``; segmenters: an smp arch + encoder."""

    name: str = "resnet50"         # timm model name (classifiers) or encoder name (segmenters)
    arch: Literal["unet", "fpn"] = "unet"
    pretrained: bool = False       # hub weights when reachable, else ``weights``
    weights: str = ""              # local or s3:// weights file for offline clusters
    dropout: float = setting(0.0, min=0.0, max=0.95)
    freeze_stages: int = setting(0, min=0, max=5)


@dataclass
class InputConfig:
    """Preprocessing: stored in every checkpoint so scoring rebuilds it exactly."""

    size: list[int] = setting([224, 224])   # [height, width] the model sees (resize)
    crop: list[int] = setting([])           # [height, width] random crops at full resolution for training
    augment: Literal["none", "light", "medium", "strong", "robust"] = "light"  # robust: medium plus
                                   # +-30% brightness/contrast, blur, noise, under-exposure (the field)
    normalize: Literal["dataset", "image"] = "dataset"  # dataset: fixed mean/std (the model's own);
                                   # image: each image to zero mean, unit std (robust to lighting)
    turns: bool = True                      # medium/strong/robust turn square images by 90 degrees; false
                                   # keeps the rolling direction (then score.tta flips, not dihedral)


@dataclass
class TrainConfig:
    epochs: int = setting(10, min=1)
    batch_size: int = setting(32, min=1)             # per worker; the global batch is this x ray.num_workers
    lr: float = setting(3e-4, min=0.0)
    weight_decay: float = setting(1e-4, min=0.0)
    scheduler: Literal["none", "cosine"] = "cosine"
    warmup_epochs: float = setting(1.0, min=0.0)
    grad_clip: float = setting(0.0, min=0.0)           # 0: off
    accum_steps: int = setting(1, min=1)
    label_smoothing: float = setting(0.0, min=0.0, max=0.5)  # multiclass cross-entropy only
    mixup: float = setting(0.0, min=0.0)              # multiclass: mixup's Beta alpha (timm Mixup); 0: off
    cutmix: float = setting(0.0, min=0.0)             # multiclass: cutmix's alpha; with mixup, half the batches each
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    imbalance: Literal["none", "pos_weight", "sampler"] = "pos_weight"
    loader_workers: int = setting(2, min=0)            # DataLoader processes per worker (decode + augment)
    metric: str = ""                              # empty: macro_f1 (classifiers) or dice (segmenters)
    keep: Literal["best", "last"] = "best"        # the checkpoint kept: best epoch by metric, or the last
                                                  # (cross-validation: a figure not chosen on its own split)
    seed: int = 0


@dataclass
class RayConfig:
    address: str = ""              # empty: connect to the running cluster, or start a local one
    num_workers: int = setting(2, min=1)
    use_gpu: bool = False
    cpus_per_worker: float = setting(1.0, min=0.0)
    storage_path: str = "~/steelray-runs"   # local folder or s3:// prefix for runs and checkpoints
    run_name: str = ""             # empty: derived from task, model and time; same name resumes
    max_failures: int = setting(0, min=-1)
    shared_paths: list[str] = setting([])  # local folders every node of the cluster mounts (NFS, EFS...);
                                   # other local paths are refused on a cluster of more than one node


@dataclass
class TuneConfig:
    """A Ray Tune sweep over this training config (``jobs/tune.py``); training ignores this section."""

    name: str = ""                 # sweep folder under ray.storage_path; empty: derived; same name resumes
    search: Literal["random", "grid", "optuna"] = "random"  # optuna: its TPE sampler (pip install optuna)
    num_samples: int = setting(0, min=0)  # trials; 0: 5 (random, optuna) or every grid point once (grid)
    scheduler: Literal["asha", "none"] = "asha"  # asha: stop trials that lag at each rung
    grace_period: int = setting(1, min=1)       # ASHA: epochs every trial runs before it may be stopped
    reduction_factor: int = setting(2, min=2)   # ASHA: 1/reduction_factor of the trials go on at each rung
    max_concurrent: int = setting(0, min=0)     # 0: as many trials as the cluster's CPUs/GPUs hold now
    seed: int = 0                  # sampler seed
    space: dict[str, dict] = setting({})  # "section.key": {loguniform|uniform|int: [lo, hi]} or {choice|grid: [...]};
                                   # empty: the Optuna study's lr, batch size, frozen stages, scheduler


SPACE_KINDS = ("loguniform", "uniform", "int", "choice", "grid")
SPACE_SECTIONS = ("model", "input", "train")  # data and ray stay fixed: every trial sees the same split


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


@dataclass
class Config:
    task: Task = "multilabel"
    data: DataConfig = field(default_factory=DataConfig)
    s3: S3Config = field(default_factory=S3Config)
    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# --- loading -------------------------------------------------------------------------------------

def load(path: str | None = None, overrides: Sequence[str] = (), cls: type = None) -> Any:
    """Read a YAML file (or start from defaults), apply ``key.sub=value`` overrides, validate."""
    raw: dict = {}
    if path:
        text = storage.read_text(path)
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return from_dict(raw, cls or Config)


def from_dict(raw: dict, cls: type = Config) -> Any:
    """Build and validate a config dataclass from a plain (possibly partial) dict."""
    cfg = build(cls, raw, "")
    _check_consistency(cfg)
    return cfg


def dump(cfg: Config) -> str:
    """The config as YAML, secrets masked: what is written next to every run."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save(cfg: Config, uri: str, s3: S3Config | None = None) -> str:
    """Write the (redacted) config as YAML to a local path or s3:// URI; returns the URI."""
    storage.write_text(uri, dump(cfg), s3 or cfg.s3)
    return uri


def _check_consistency(cfg: Any) -> None:
    """Rules that involve more than one field."""
    if isinstance(cfg, SynthJob):
        if len(cfg.synth.class_freq) != 4 or not sum(cfg.synth.class_freq) > 0:
            raise ConfigError(f"synth.class_freq: 4 relative frequencies (classes 1-4), not all 0; "
                              f"got {cfg.synth.class_freq}")
        return
    if isinstance(cfg, ScoreJob):
        sc = cfg.score
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
        return
    if isinstance(cfg, NightReportJob):
        if cfg.report.night and not is_date(cfg.report.night):
            raise ConfigError(f"report.night: expected YYYY-MM-DD, got {cfg.report.night!r}")
        return
    if not isinstance(cfg, Config):
        return
    d = cfg.data
    if d.in_chans not in (1, 3):
        raise ConfigError(f"data.in_chans: must be 1 or 3, got {d.in_chans}")
    if d.folds == 1:
        raise ConfigError("data.folds: use 0 (a single train/validation split) or >= 2 for k-fold")
    if d.folds and d.fold >= d.folds:
        raise ConfigError(f"data.fold: must be < data.folds ({d.folds}), got {d.fold}")
    if d.format == "csv" and not d.labels_csv:
        raise ConfigError("data.labels_csv: required when data.format is csv")
    if (cfg.train.mixup or cfg.train.cutmix) and cfg.task != "multiclass":
        raise ConfigError(f"train.mixup / train.cutmix: mix one-label classes (task multiclass), not {cfg.task}")
    if cfg.task == "segmentation" and d.format != "severstal":
        raise ConfigError("task: segmentation needs masks, which only data.format=severstal has; "
                          f"got data.format={d.format}")
    for name in ("size", "crop"):
        value = getattr(cfg.input, name)
        if value and (len(value) != 2 or min(value) < 8):
            raise ConfigError(f"input.{name}: expected [height, width] of at least 8 each, got {value}")
    if not cfg.input.size:
        raise ConfigError("input.size: required, e.g. [224, 224] or [256, 1600]")
    if cfg.task == "segmentation":
        for name in ("size", "crop"):
            value = getattr(cfg.input, name)
            if value and any(v % 32 for v in value):
                raise ConfigError(f"input.{name}: a segmenter's encoder halves the image 5 times, so height and "
                                  f"width must be multiples of 32; got {value}")
    _check_space(cfg)


def _check_space(cfg: Config) -> None:
    """Every tune.space entry names a model/input/train key, has a known form, and each of its
    end points or choices makes a valid training config."""
    t = cfg.tune
    base = None
    for name, spec in t.space.items():
        key = f"tune.space.{name}"
        section, _, field_name = name.partition(".")
        if name == "data.fold":  # cross-validation: the same recipe on each fold (jobs/crossval.py)
            if cfg.data.folds < 2:
                raise ConfigError(f"{key}: sweeping folds needs data.folds >= 2, got {cfg.data.folds}")
        elif section not in SPACE_SECTIONS or "." in field_name or not field_name:
            raise ConfigError(f"{key}: expected section.key with section one of {', '.join(SPACE_SECTIONS)} "
                              "(data and ray stay fixed across trials, but for data.fold), e.g. train.lr")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
            raise ConfigError(f"{key}: expected one of {{{': [...]}, {'.join(SPACE_KINDS)}: [...]}}, got {spec!r}")
        (kind, values), = spec.items()
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{key}: {kind} needs a non-empty list, got {values!r}")
        if kind in ("loguniform", "uniform", "int"):
            try:  # YAML reads 1e-5 (no dot) as a string
                values = [coerce(v, int if kind == "int" else float, key) for v in values]
            except ConfigError:
                values = None
            if (values is None or len(values) != 2 or not values[0] < values[1]
                    or (kind == "loguniform" and values[0] <= 0)):
                raise ConfigError(f"{key}: {kind} needs [low, high] with low < high"
                                  f"{' and low > 0' if kind == 'loguniform' else ''}"
                                  f"{' (integers)' if kind == 'int' else ''}, got {values}")
            if t.search == "grid":
                raise ConfigError(f"{key}: tune.search=grid tries listed values only; write "
                                  f"{{grid: [...]}} or {{choice: [...]}} instead of {kind}")
        if kind == "grid" and t.search == "optuna":
            raise ConfigError(f"{key}: tune.search=optuna samples, it cannot take grid; use choice")
        base = base if base is not None else {k: v for k, v in to_dict(cfg, redact=False).items() if k != "tune"}
        checked = []
        for v in values:
            trial = {**base, section: {**base[section], field_name: v}}
            try:
                built = build(Config, trial, "")
            except ConfigError as e:
                raise ConfigError(f"{key}: value {v!r} does not make a valid config: {e}") from None
            checked.append(getattr(getattr(built, section), field_name))  # typed: "1e-3" -> 0.001
        t.space[name] = {kind: checked}
