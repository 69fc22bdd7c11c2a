"""Training images/s: Ray Train with 1 and 2 CPU workers against a plain single-process PyTorch loop,
same model, data, transforms and epoch function, measured side by side in one run.

    python benchmarks/train_throughput.py [--data ../shared/data/neu-det] [--model resnet18] [--size 128]

Each setting trains ``--epochs`` epochs; the figure is the last epoch's images/s (the first one
includes warm-up). Uses the real NEU images when present, else synthetic NEU-format images.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path


import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from steelray import config, data, models, synth, train, train_data  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "neu-det"


def plain_loop(cfg: config.Config, manifest: data.Manifest, epochs: int, threads: int) -> float:
    """The notebook way: one process, one model, a DataLoader; the same epoch function as Ray Train's."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    train_m, _ = data.split(manifest, cfg.data)
    records = train_data.records(train_m, cfg.task)
    pre = models.preprocess_for(cfg)
    model = models.build_model(cfg, len(manifest.classes))
    loader = DataLoader(train_data.SheetDataset(records, cfg.task, pre, cfg.input.augment, train=True), batch_size=cfg.train.batch_size, shuffle=True,
                        num_workers=0, drop_last=True)
    loss_fn = train.make_loss(cfg.task, None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    rate = 0.0
    for _ in range(epochs):
        start = time.perf_counter()
        _, seen = train.train_epoch(model, loader, loss_fn, optimizer, scheduler, cfg, pre, torch.device("cpu"), False)
        rate = seen / (time.perf_counter() - start)
    return rate


def ray_train(cfg: config.Config, workers: int, cpus: float, storage: str) -> float:
    cfg = config.load(None, [f"{k}={v}" for k, v in _flat(config.to_dict(cfg, redact=False))] + [
        f"ray.num_workers={workers}", f"ray.cpus_per_worker={cpus}", f"ray.storage_path={storage}",
        f"ray.run_name=tp-{workers}w"])
    result = train.fit(cfg)
    rows = pd.read_csv(f"{result.run_uri}/metrics.csv")
    return float(rows["train_images_per_s"].iloc[-1])


def _flat(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        elif v not in ("", [], None):
            yield f"{prefix}{k}", (f"[{','.join(map(str, v))}]" if isinstance(v, list) else v)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REAL) if REAL.exists() else "")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--limit", type=int, default=600, help="images used (default 600)")
    args = p.parse_args()
    root = args.data
    if not root:
        root = tempfile.mkdtemp(prefix="neu-synth-")
        synth.make_neu(root, 100)
    cfg = config.load("jobs/configs/neu.yaml", [
        f"data.root={root}", f"model.name={args.model}", f"input.size=[{args.size},{args.size}]",
        f"train.epochs={args.epochs}", f"data.limit={args.limit}", "data.val_fraction=0.1", "train.warmup_epochs=0",
        "train.loader_workers=0"])
    manifest = data.build_manifest(cfg)
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as storage:
        results = {"plain PyTorch loop, 1 process": plain_loop(cfg, manifest, args.epochs, os.cpu_count() or 1)}
        results["Ray Train, 1 worker"] = ray_train(cfg, 1, float(os.cpu_count() or 1), storage)
        results["Ray Train, 2 workers (DDP, gloo)"] = ray_train(cfg, 2, (os.cpu_count() or 2) / 2, storage)
    base = results["plain PyTorch loop, 1 process"]
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, ray {ray.__version__}")
    print(f"data: {root} ({len(manifest)} images, {int(len(manifest) * 0.9)} trained per epoch), model {args.model} "
          f"at {args.size}x{args.size}, batch {cfg.train.batch_size}, epoch {args.epochs} of {args.epochs}")
    for name, rate in results.items():
        print(f"{name:36s} {rate:7.1f} img/s   {rate / base:5.2f}x plain")


if __name__ == "__main__":
    main()
