"""What an image goes through before the model, as stored in every checkpoint. Kept apart from
``models`` (which imports torch) so that scoring's decode workers stay light."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preprocess:
    """What an image goes through before the model: stored in every checkpoint, rebuilt by scoring."""

    size: tuple[int, int]          # (height, width) of the model's input at evaluation
    crop: tuple[int, int] | None   # random crop (height, width) for training at full resolution
    in_chans: int
    mean: tuple[float, ...]        # per channel, on a 0..1 scale (normalize "dataset")
    std: tuple[float, ...]
    normalize: str = "dataset"     # "image": each image's own mean and std instead (all channels)

    def to_dict(self) -> dict:
        return {"size": list(self.size), "crop": list(self.crop) if self.crop else None,
                "in_chans": self.in_chans, "mean": list(self.mean), "std": list(self.std),
                "normalize": self.normalize}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(tuple(d["size"]), tuple(d["crop"]) if d.get("crop") else None, d["in_chans"],
                   tuple(d["mean"]), tuple(d["std"]), d.get("normalize", "dataset"))
