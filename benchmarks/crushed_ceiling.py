"""How well can a model of the recipe do on "crushed" images at all? A specialist: the config's model,
schedule and normalisation trained on one fold's training images with every image crushed
(``steelray/conditions.py``, as evaluation applies it: at full resolution, before the resize), then
measured on that fold's validation images, crushed and clean. No generalist trained on clean and
crushed images alike should beat it on crushed images, so its crushed macro-F1, against the
generalist's clean macro-F1 on the same images, says whether a crushed drop under 0.03 is within
reach of this model and budget, or only of a different one.

    .ci/in-venv python benchmarks/crushed_ceiling.py --data ../shared/data/neu-det --fold 0 [key=value ...]

One process, a plain PyTorch loop (``train.train_epoch``, the loop Ray Train runs), the config's
global batch (``train.batch_size`` x ``ray.num_workers``); flips and 90-degree turns as the ``medium``
preset draws them are applied after the crush. Prints one JSON line; ``--save DIR`` also keeps the
specialist as a checkpoint (for ``benchmarks/crushed_routing.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import albumentations as A  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import f1_score  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from steelray import checkpoint, conditions, config, data, images, model_io, models, presets, train, train_data  # noqa: E402
from steelray.predict import EvalImages  # noqa: E402


class Crushed(Dataset):
    """Training images, each crushed at full resolution, resized, then flipped/turned by ``augment``."""

    def __init__(self, records: list[dict], pre: model_io.Preprocess, augment: str, seed: int, dark: float | None):
        self.records, self.pre = records, pre
        self.transform = presets.build(pre, augment, seed=seed)
        self.dark = None  # None: evaluation's own crush; else the robust preset's under-exposure at this depth
        if dark is not None:
            self.dark = A.Compose([presets.underexposure(1.0, dark)])
            presets.reseed(self.dark, seed + 1)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        r = self.records[i]
        image = images.load_image(r["uri"], self.pre.in_chans)
        image = conditions.perturb_image(image, "crushed", seed=i) if self.dark is None else self.dark(image=image)["image"]
        image = self.transform(image=model_io.resize(image, self.pre.size))["image"]
        return model_io.to_chw(image), torch.tensor(r["target"], dtype=torch.long)


@torch.no_grad()
def scores(model, m: data.Manifest, pre: model_io.Preprocess, perturb: str | None) -> dict:
    """Accuracy and macro-F1 (argmax) on ``m``'s images as evaluation's robustness pass loads them."""
    model.eval()
    preds = []
    for x, *_ in DataLoader(EvalImages(list(m.records.uri), pre, perturb), batch_size=64):
        preds.append(model(model_io.model_input(x, pre)).argmax(1).numpy())
    return figures(np.concatenate(preds), m.targets("multiclass"))


def figures(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Accuracy, macro-F1 and wrong images of argmax predictions."""
    return {"accuracy": float((pred == truth).mean()), "macro_f1": float(f1_score(truth, pred, average="macro")),
            "wrong": int((pred != truth).sum())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a NEU folder")
    p.add_argument("--config", default="jobs/configs/neu.yaml")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--augment", default="medium", help="preset drawn after the crush (default: flips and turns, +-20%% light)")
    p.add_argument("--crush", choices=("condition", "underexposure"), default="condition",
                   help="condition: every training image crushed as evaluation crushes it; underexposure: the robust "
                        "preset's under-exposure on every image, drawn anew each time, at input.underexposure_depth")
    p.add_argument("--save", default="", help="also write the specialist as a steelray checkpoint into this folder")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = p.parse_args()
    cfg = config.load(args.config, [f"data.root={args.data}", f"data.folds={args.folds}", f"data.fold={args.fold}",
                                    *args.overrides])
    if cfg.task != "multiclass":
        sys.exit("crushed_ceiling: a multiclass config (NEU) only")
    torch.manual_seed(cfg.train.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    train_m, val_m = data.split(data.build_manifest(cfg), cfg.data)
    records = train_data.records(train_m, cfg.task)
    pre = models.preprocess_for(cfg)
    model = models.build_model(cfg, len(train_m.classes)).to(memory_format=torch.channels_last)
    batch = cfg.train.batch_size * cfg.ray.num_workers
    depth = None if args.crush == "condition" else cfg.input.underexposure_depth
    loader = DataLoader(Crushed(records, pre, args.augment, cfg.train.seed, depth), batch_size=batch, shuffle=True, drop_last=True)
    targets = np.array([r["target"] for r in records])
    loss_fn = train.make_loss(cfg.task, train_data.imbalance_weights(cfg.task, targets, len(train_m.classes)),
                              cfg.train.label_smoothing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    total, warmup = len(loader) * cfg.train.epochs, int(cfg.train.warmup_epochs * len(loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: train.lr_factor(s, total, warmup, cfg.train.scheduler == "cosine"))
    started = time.perf_counter()
    for epoch in range(cfg.train.epochs):
        model.train()
        loss, _ = train.train_epoch(model, loader, loss_fn, optimizer, scheduler, cfg, pre, torch.device("cpu"), False)
        if (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1}/{cfg.train.epochs} train_loss {loss:.3f} ({time.perf_counter() - started:.0f} s)",
                  file=sys.stderr, flush=True)
    if args.save:
        checkpoint.write(args.save, model, checkpoint.make_meta(cfg, train_m.classes, pre, epoch=cfg.train.epochs))
    print(json.dumps({
        "fold": args.fold, "folds": args.folds, "train_images": len(train_m), "val_images": len(val_m),
        "model": cfg.model.name, "size": list(cfg.input.size), "normalize": cfg.input.normalize,
        "epochs": cfg.train.epochs, "batch": batch, "augment_after_crush": args.augment, "crush": args.crush,
        "depth": depth,
        "crushed": scores(model, val_m, pre, "crushed"), "clean": scores(model, val_m, pre, None),
        "train_s": round(time.perf_counter() - started), "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "torch": torch.__version__}))


if __name__ == "__main__":
    main()
