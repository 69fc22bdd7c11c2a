"""One typed config tree for every job: dataclasses, loaded from YAML, overridden from the command line.

    cfg = config.load("jobs/configs/neu.yaml", ["train.lr=3e-4", "data.root=s3://bucket/neu"])

Every value is checked before any work starts: an unknown key names the valid keys, a wrong type
names the expected type, a value out of range or not among the choices says which are allowed.
The loader's mechanics (overrides, types, ranges) are in ``steelray.config_loader``; this module
holds training's tree (``Config``: data, model, input, train, ray, tune), the other jobs' configs
are in ``steelray.job_configs``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import yaml

from steelray import storage
from steelray.config_loader import (SECRET_MASK, ConfigError, apply_override, build, coerce, is_date,  # noqa: F401
                                     setting, to_dict)
from steelray.job_configs import (EvaluateConfig, EvaluateJob, ExportConfig, ExportJob,  # noqa: F401
                                  NightReportConfig, NightReportJob, ScoreConfig, ScoreJob, SynthConfig, SynthJob)
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
    augment: Literal["none", "light", "medium", "strong", "robust", "dark"] = "light"  # robust: medium plus
                                   # +-30% brightness/contrast, blur, noise, under-exposure (the field);
                                   # dark: every image under-exposed, then medium (a route for clipped sheets)
    normalize: Literal["dataset", "image", "center", "equalize"] = "dataset"  # dataset: fixed mean/std (the model's own);
                                   # image: each image to zero mean, unit std (robust to lighting);
                                   # center: each image less its own mean, over the fixed std
                                   # (stray light removed, the sheet's contrast kept);
                                   # equalize: each pixel to its rank in its image (any exposure)
    turns: bool = True                      # medium/strong/robust turn square images by 90 degrees; false
                                   # keeps the rolling direction (then score.tta flips, not dihedral)
    underexposure: float = setting(0.4, min=0.0, max=1.0)        # robust: share of images under-exposed
    underexposure_depth: float = setting(0.4, min=0.3, max=0.9)  # robust, dark: darkest exposure, of full scale


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
    seed: int = 0                                 # weights, sampling order and augmentations (per worker)


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
        except (yaml.YAMLError, ValueError) as e:  # ValueError: a date-like value that is no date (2026-13-01)
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
    if hasattr(cfg, "check"):  # a job's config (steelray.job_configs) holds its own rules
        cfg.check()
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
