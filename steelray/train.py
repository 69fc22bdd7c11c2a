"""Distributed training on Ray Train (V2): TorchTrainer + DDP, gloo on CPU workers.

``fit(cfg)`` builds the manifest once on the driver, splits it, and hands each worker the records;
every worker reads only its own shard of images (a distributed sampler over the manifest, images
fetched lazily by URI from disk or S3) with decoding and augmentation in DataLoader processes
(``steelray.train_data``).
Rank 0 validates, writes the checkpoint and the metrics file; every rank reports.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from steelray import checkpoint, cluster, config, data, metrics, model_io, models, storage, tracking, train_data
from steelray.config import Config

log = logging.getLogger(__name__)  # worker-side progress: Ray Train routes it to the console and job logs

CLASSIFIER_METRICS = ("accuracy", "macro_f1", "roc_auc", "val_loss")
SEGMENTER_METRICS = ("dice", "val_loss")


@dataclass
class TrainResult:
    run_uri: str
    best_checkpoint: str
    best_metrics: dict
    epochs: int
    tracking: str = ""  # the MLflow run, or why tracking stopped (tracking never fails training)


# --- the driver ---------------------------------------------------------------------------------

@dataclass
class Prepared:
    """The labelled set, read once on the driver: class names and each split's records."""

    classes: list[str]
    train: list[dict]
    val: list[dict]
    summary: str


def prepare(cfg: Config, manifest: data.Manifest | None = None) -> Prepared:
    """Build the manifest (checks every image when ``data.verify_images``), or take the one given,
    and split it as ``cfg.data`` says."""
    manifest = data.build_manifest(cfg) if manifest is None else manifest
    train_m, val_m = data.split(manifest, cfg.data)
    return Prepared(manifest.classes, train_data.records(train_m, cfg.task), train_data.records(val_m, cfg.task),
                    manifest.summary())


def fit(cfg: Config, prepared: Prepared | None = None, callbacks=(), parent: dict | None = None) -> TrainResult:
    """Train ``cfg`` on the connected Ray cluster (or a local one); returns the best checkpoint.
    ``callbacks`` are Ray Train callbacks (a Tune trial passes ``TuneReportCallback``); ``parent``
    the sweep's MLflow run (``tracking.Run.info()``), which this run is a child of."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    metric = target_metric(cfg)
    cluster.check_shared([("data.root", cfg.data.root), ("ray.storage_path", cfg.ray.storage_path)],
                         cfg.ray.shared_paths, cfg.ray.address)
    prepared = prepared or prepare(cfg)
    run_name = cfg.ray.run_name or f"{cfg.task}-{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = replace(cfg, ray=replace(cfg.ray, run_name=run_name))
    storage_uri = storage.absolute(cfg.ray.storage_path)
    run_uri = storage.join(storage_uri, run_name)
    config.save(cfg, storage.join(run_uri, "config.yaml"))
    print(f"training {cfg.task} {cfg.model.name} on {len(prepared.train)} images, validating on "
          f"{len(prepared.val)} ({prepared.summary}); run folder {run_uri}", flush=True)

    if not ray.is_initialized():
        ray.init(address=cfg.ray.address or None)
    run = tracking.start_training(cfg, run_uri, prepared.train, prepared.val, prepared.classes, parent)
    storage_path, storage_fs = storage.pyarrow_filesystem(storage_uri, cfg.s3)
    loop_config = {"config": config.to_dict(cfg, redact=False), "classes": prepared.classes,
                   "train": prepared.train, "val": prepared.val, "run_uri": run_uri, "tracking": run.info()}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
        run_config=RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=storage_fs, callbacks=list(callbacks),
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="epoch"
                                               if cfg.train.keep == "last" else metric,
                                               checkpoint_score_order="max" if cfg.train.keep == "last"
                                               else mode(metric)),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            # Ray Train's INFO lines (a checkpoint written, each epoch) repeat the epoch line printed
            # below; its warnings and errors (a worker lost, a restart) still show.
            logging_config=LoggingConfig(log_level="WARNING")),
    )
    try:
        result = trainer.fit()
    except BaseException:
        run.end("FAILED")
        raise
    best, best_metrics = max(result.best_checkpoints or [],
                             key=lambda cm: cm[1][metric] if mode(metric) == "max" else -cm[1][metric],
                             default=(None, {}))
    if best is None:
        run.end("FAILED")
        raise RuntimeError(f"run {run_uri} finished without a checkpoint")
    best_uri = f"s3://{best.path}" if storage.is_s3(storage_uri) else best.path
    storage.write_text(storage.join(run_uri, "best_checkpoint.txt"), best_uri + "\n", cfg.s3)
    out = TrainResult(run_uri, best_uri, best_metrics, int(result.metrics.get("epoch", 0)))
    tracking.end_training(run, cfg, out, metric,
                          SEGMENTER_METRICS if cfg.task == "segmentation" else CLASSIFIER_METRICS)
    out.tracking = run.summary()
    return out


def mode(metric: str) -> str:
    """Whether a reported metric is better high (``max``) or low (``min``: the losses)."""
    return "min" if metric.endswith("loss") else "max"


def target_metric(cfg: Config) -> str:
    valid = SEGMENTER_METRICS if cfg.task == "segmentation" else CLASSIFIER_METRICS
    metric = cfg.train.metric or ("dice" if cfg.task == "segmentation" else "macro_f1")
    if metric not in valid:
        raise config.ConfigError(f"train.metric: {metric!r} is not reported for {cfg.task}; "
                                 f"choose one of: {', '.join(valid)}")
    return metric


# --- the loop -----------------------------------------------------------------------------------

def make_loss(task: str, weights: torch.Tensor | None, label_smoothing: float = 0.0):
    if task == "multiclass":
        return nn.CrossEntropyLoss(weight=weights, label_smoothing=label_smoothing)
    bce = nn.BCEWithLogitsLoss(pos_weight=weights)
    if task == "binary":
        return lambda logits, y: bce(logits.squeeze(1), y)
    if task == "multilabel":
        return bce
    import segmentation_models_pytorch as smp

    dice = smp.losses.DiceLoss(mode="multilabel", from_logits=True)
    plain_bce = nn.BCEWithLogitsLoss()
    return lambda logits, y: plain_bce(logits, y) + dice(logits, y)


def lr_factor(step: int, total: int, warmup: int, cosine: bool) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to zero (or constant)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if not cosine:
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class _QuietReports(logging.Filter):
    """Drops Ray Train's INFO lines from loggers named by a file path inside Ray Train: in Ray 2.60
    every worker logs each report ("Reporting training result ...", the whole metrics dict) that
    way, out of reach of ``LoggingConfig``, which covers only loggers named ``ray.train...``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or f"{os.sep}ray{os.sep}train{os.sep}" not in record.name


def make_mixup(cfg: Config, n_classes: int):
    """timm's Mixup/CutMix for a multiclass batch (``mix(x, y)`` -> mixed images, class probabilities,
    which ``make_loss``'s cross-entropy takes as they are, smoothing included), or None when off."""
    if not (cfg.train.mixup or cfg.train.cutmix):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.train.mixup, cutmix_alpha=cfg.train.cutmix, label_smoothing=0.0,
                 num_classes=n_classes)


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's per-worker function: typed config first, then an ordinary PyTorch loop."""
    import ray.train
    import ray.train.torch

    for handler in logging.getLogger().handlers:  # set up by Ray Train before this function runs
        handler.addFilter(_QuietReports())

    cfg = config.from_dict(loop_config["config"])
    classes, run_uri = loop_config["classes"], loop_config["run_uri"]
    train_records, val_records = loop_config["train"], loop_config["val"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and on_gpu)
    torch.manual_seed(cfg.train.seed + rank)
    np.random.seed(cfg.train.seed + rank)  # timm's Mixup draws from numpy's global generator
    if not on_gpu:
        torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))

    pre = models.preprocess_for(cfg)
    model = models.build_model(cfg, len(classes))
    model = model.to(memory_format=torch.channels_last)  # faster on GPU, and on CPU through oneDNN
    model = ray.train.torch.prepare_model(model)
    n_out = models.num_outputs(cfg.task, len(classes))

    train_targets = np.array([r["target"] for r in train_records])
    weights = None
    if cfg.train.imbalance == "pos_weight" or (cfg.train.imbalance != "none" and cfg.task == "multiclass"):
        if cfg.task != "segmentation":
            weights = train_data.imbalance_weights(cfg.task, train_targets, n_out).to(device)
    loss_fn = make_loss(cfg.task, weights, cfg.train.label_smoothing)
    mix = make_mixup(cfg, len(classes))
    sampler = train_data.ShardedSampler(len(train_records), rank, world, cfg.train.seed,
                             train_data.sample_weights(cfg.task, train_targets)
                             if cfg.train.imbalance == "sampler" and cfg.task != "segmentation" else None)
    loader_workers = cfg.train.loader_workers
    train_loader = DataLoader(
        train_data.SheetDataset(train_records, cfg.task, pre, cfg.input.augment, cfg.s3, train=True, turns=cfg.input.turns,
                                seed=cfg.train.seed * 1000 + rank,  # augmentations as reproducible as the rest
                                dark=(cfg.input.underexposure, cfg.input.underexposure_depth)),
        batch_size=cfg.train.batch_size, sampler=sampler, num_workers=loader_workers, worker_init_fn=train_data.seed_worker,
        pin_memory=on_gpu, drop_last=len(sampler) > cfg.train.batch_size, persistent_workers=loader_workers > 0)
    val_loader = DataLoader(train_data.SheetDataset(val_records, cfg.task, pre, s3=cfg.s3),
                            batch_size=cfg.train.batch_size, num_workers=loader_workers)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    steps_per_epoch = max(1, len(train_loader) // cfg.train.accum_steps)
    total = steps_per_epoch * cfg.train.epochs
    warmup = int(cfg.train.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, cfg.train.scheduler == "cosine"))

    start_epoch, history = 0, []
    resumed = ray.train.get_checkpoint()  # after a worker failure, or a rerun of the same run name
    if resumed:
        with resumed.as_directory() as folder:
            from safetensors.torch import load_file

            checkpoint.unwrap(model).load_state_dict(load_file(os.path.join(folder, checkpoint.WEIGHTS)))
            state = checkpoint.load_train_state(folder)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"], state["history"]
        if rank == 0:
            log.info("resumed from epoch %d (%s)", start_epoch, resumed.path)
    resumed_from = start_epoch

    metric = target_metric(cfg)
    run = tracking.Run.attach(loop_config.get("tracking") if rank == 0 else None)  # rank 0 logs, as Ray advises
    for epoch in range(start_epoch, cfg.train.epochs):
        sampler.set_epoch(epoch)
        started = time.perf_counter()
        train_loss, seen = train_epoch(model, train_loader, loss_fn, optimizer, scheduler, cfg, pre, device, bf16,
                                       mix)
        elapsed = time.perf_counter() - started
        if not math.isfinite(train_loss):  # before validation, whose metrics cannot take NaN scores
            raise FloatingPointError(f"training diverged at epoch {epoch + 1}: train_loss {train_loss} "
                                     f"(lr {cfg.train.lr}); lower train.lr or enable train.grad_clip")
        row = {"epoch": epoch + 1, "train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"],
               "train_images_per_s": seen * world / elapsed, "resumed_from_epoch": resumed_from}
        if rank == 0:
            row.update(_validate(checkpoint.unwrap(model), val_loader, loss_fn, cfg, pre, device, bf16))
        row = _broadcast(row)
        history.append(row)
        if rank == 0:
            log.info("epoch %d/%d %s (%.1fs)", epoch + 1, cfg.train.epochs, " ".join(
                f"{k} {v:.4g}" for k, v in row.items() if k not in ("epoch", "resumed_from_epoch")), elapsed)
            _write_history(history, run_uri, cfg)
            run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
            with tempfile.TemporaryDirectory() as folder:
                meta = checkpoint.make_meta(cfg, classes, pre, epoch=epoch + 1, metrics=row, run_id=run.run_id)
                checkpoint.write(folder, model, meta, {"optimizer": optimizer.state_dict(),
                                                       "scheduler": scheduler.state_dict(),
                                                       "epoch": epoch + 1, "history": history})
                ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(folder),
                                 checkpoint_dir_name=f"epoch-{epoch + 1:04d}")
        else:
            ray.train.report(row)
    if rank == 0 and history:
        pick = min if metric.endswith("loss") else max
        log.info("best %s: %.4g", metric, pick(h[metric] for h in history))


def train_epoch(model, loader, loss_fn, optimizer, scheduler, cfg: Config, pre: model_io.Preprocess, device,
                bf16: bool, mix=None):
    model.train()
    total, seen = 0.0, 0
    accum = cfg.train.accum_steps
    optimizer.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(loader):
        x, y = model_io.model_input(x.to(device, non_blocking=True), pre), y.to(device, non_blocking=True)
        if mix is not None and len(x) % 2 == 0:  # timm mixes a batch with its reverse: pairs needed
            x, y = mix(x, y)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model(x), y)
        (loss / accum).backward()
        if (i + 1) % accum == 0 or i + 1 == len(loader):
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        total += loss.item() * len(x)
        seen += len(x)
    return total / max(seen, 1), seen


@torch.no_grad()
def _validate(model, loader, loss_fn, cfg: Config, pre: model_io.Preprocess, device, bf16: bool) -> dict:
    model.eval()
    losses, outputs, targets = [], [], []
    n = 0
    for x, y in loader:
        x, y = model_io.model_input(x.to(device), pre), y.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        losses.append(loss_fn(logits.float(), y).item() * len(x))
        n += len(x)
        probs = model_io.probabilities(logits, cfg.task)
        outputs.append((probs > 0.5 if cfg.task == "segmentation" else probs).cpu().numpy())
        targets.append(y.cpu().numpy())
    out = {"val_loss": sum(losses) / max(n, 1)}
    pred, truth = np.concatenate(outputs), np.concatenate(targets)
    if cfg.task == "segmentation":
        out["dice"] = metrics.mean_dice(pred, truth > 0.5)
    else:
        if cfg.task == "binary":
            pred = pred[:, 0]
        out.update(metrics.classification(cfg.task, pred, truth))
    return out


def _broadcast(row: dict) -> dict:
    """Rank 0's metrics on every rank (so every rank reports the same row)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return row
    box = [row]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _write_history(history: list[dict], run_uri: str, cfg: Config) -> None:
    keys = list(dict.fromkeys(k for h in history for k in h))
    lines = [",".join(keys)] + [",".join(f"{h.get(k, '')}" for k in keys) for h in history]
    storage.write_text(storage.join(run_uri, "metrics.csv"), "\n".join(lines) + "\n", cfg.s3)
