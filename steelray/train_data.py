"""Training's data on the workers: the manifest's rows as records, the dataset that reads, decodes,
resizes and augments them lazily (in DataLoader processes), each rank's sampler, and the weights
that answer class imbalance. ``steelray.train`` runs the loop over them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from steelray import data, images, model_io, presets, rle


def records(m: data.Manifest, task: str) -> list[dict]:
    targets = m.targets(task)
    return [{"image_id": r.image_id, "uri": r.uri, "target": t.tolist() if hasattr(t, "tolist") else t,
             "rles": list(r.rles) if r.rles is not None else None}
            for r, t in zip(m.records.itertuples(), targets)]


class SheetDataset(Dataset):
    """Images read lazily by URI, decoded, resized (or, in training with ``input.crop``, randomly
    cropped) and augmented in the DataLoader's processes; uint8 CxHxW out, normalised on the device
    by ``model_io.model_input``."""

    def __init__(self, records: list[dict], task: str, pre: model_io.Preprocess, augment: str = "none",
                 s3=None, train: bool = False, turns: bool = True, seed: int | None = None,
                 dark: tuple[float, float] = presets.UNDEREXPOSURE):
        self.records, self.task, self.pre, self.s3 = records, task, pre, s3
        self.transform = presets.build(pre, augment, turns, seed, dark) if train else None
        self.resize = not (train and pre.crop)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        r = self.records[i]
        image = images.load_image(r["uri"], self.pre.in_chans, self.s3)
        masks = None
        if self.task == "segmentation":
            masks = np.stack([rle.decode(x, image.shape[:2]) for x in r["rles"]], axis=-1).astype(np.uint8)
        if self.resize:
            image = model_io.resize(image, self.pre.size)
            masks = None if masks is None else model_io.resize_mask(masks, self.pre.size)
        if self.transform is not None:
            out = self.transform(image=image, **({} if masks is None else {"mask": masks}))
            image, masks = out["image"], out.get("mask")
        if masks is not None:
            return model_io.to_chw(image), torch.from_numpy(np.ascontiguousarray(masks.transpose(2, 0, 1),
                                                                                 dtype=np.float32))
        dtype = torch.long if self.task == "multiclass" else torch.float32
        return model_io.to_chw(image), torch.tensor(r["target"], dtype=dtype)


def seed_worker(worker_id: int) -> None:
    """A DataLoader's ``worker_init_fn``: each loader process draws its own augmentations, from the
    seed torch gives that worker (drawn from the seeded parent: the same every run). Without it,
    every forked worker starts from a copy of one albumentations random state and repeats the
    others' draws."""
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if transform is not None:
        presets.reseed(transform, info.seed % 2**32)


class ShardedSampler(Sampler):
    """This rank's share of an epoch: a seeded permutation (or, for imbalance=sampler, a seeded
    weighted draw with replacement) split across ranks, the same length on every rank."""

    def __init__(self, n: int, rank: int, world: int, seed: int, weights: np.ndarray | None = None):
        self.n, self.rank, self.world, self.seed, self.weights = n, rank, world, seed, weights
        self.epoch = 0
        self.per_rank = math.ceil(n / world)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        total = self.per_rank * self.world
        if self.weights is None:
            order = torch.randperm(self.n, generator=g)
            order = torch.cat([order, order[: total - self.n]])  # pad so every rank gets as many
        else:
            order = torch.multinomial(torch.as_tensor(self.weights, dtype=torch.double), total, True, generator=g)
        return iter(order[self.rank::self.world].tolist())

    def __len__(self) -> int:
        return self.per_rank


def imbalance_weights(task: str, targets: np.ndarray, num_outputs: int):
    """pos_weight (BCE: negatives/positives per class, clipped to [1, 100]) or class weights
    (cross-entropy: inverse frequency, mean 1)."""
    if task == "multiclass":
        counts = np.bincount(targets, minlength=num_outputs).astype(float)
        w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / num_outputs, 1.0)
        return torch.tensor(w, dtype=torch.float32)
    t = targets.reshape(len(targets), -1)
    pos = t.sum(axis=0)
    return torch.tensor(np.clip((len(t) - pos) / np.maximum(pos, 1), 1.0, 100.0), dtype=torch.float32)


def sample_weights(task: str, targets: np.ndarray) -> np.ndarray:
    """Per-image weights for imbalance=sampler: inverse frequency of the image's rarest label."""
    if task == "multiclass":
        counts = np.bincount(targets)
        return 1.0 / counts[targets]
    t = targets.reshape(len(targets), -1)
    freq = np.concatenate([t, (t.sum(axis=1, keepdims=True) == 0)], axis=1)  # 'no defect' counts too
    per_label = freq.sum(axis=0)
    return np.array([1.0 / per_label[row > 0].min() for row in freq])
