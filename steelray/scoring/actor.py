"""The model actor of the scoring pipeline (a Ray Data callable class): loads the checkpoint(s)
once in ``__init__``, then turns each decoded batch into output rows in ``__call__``.

Per batch: a checkpoint's model (``TorchModel``) takes the uint8 images to the device, ``model_io``
normalises them there, and runs (bf16 autocast on GPU; compiled where ``score.compile`` says); an
exported model (``ExportedModel``, ``score.engine=onnxruntime``) takes them as they are, its graph
normalising them. The probabilities become labels (``plan.classify``) or masks at each sheet's own
size (``model_io.masks``). A cascade's segmenter runs only on the sheets its classifier flags. The
line-side scorer (``steelray.line``) calls ``Scorer`` too, one image at a time.
"""

from __future__ import annotations

import datetime as dt
import logging
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from steelray import ensemble, input_stats, model_io, onnx_model, rle
from steelray.scoring.compiled import CompileCache, CompiledModel, padded_size
from steelray.scoring.plan import ModelInfo, Plan, classify, column_name, gate_classes
from steelray.storage import S3Config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActorSettings:
    """How a model actor runs its models (from ``score.*``, worked out by the job)."""

    device: str = "cpu"
    threads: int = 0               # torch threads; 0: torch's default
    precision: str = "auto"        # auto: bf16-mixed on GPU, fp32 on CPU; bf16-mixed: autocast; bf16: weights too
    compile: bool = False
    batch: int = 0                 # the model batch: a compiled model pads shorter ones, at most to this
    compile_cache: str = ""        # folder for torch's compile cache; empty: none
    s3: S3Config | None = None


class Scorer:
    """``Scorer(plan, settings)(batch) -> pa.Table`` of output rows, one per input row. A checkpoint
    runs in PyTorch (``TorchModel``), an exported model in ONNX Runtime (``ExportedModel``: no torch
    import, which the line-side scorer relies on), an ensemble as its members (``EnsembleModel``)."""

    def __init__(self, plan: Plan, settings: ActorSettings):
        ours = logging.getLogger("steelray")
        if not logging.getLogger().handlers and not ours.handlers:  # a Ray worker: our lines to its log
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            ours.addHandler(handler)
            ours.setLevel(logging.INFO)
        self.plan, self.schema = plan, plan.schema()
        cache = None
        if settings.compile and settings.compile_cache:
            cache = CompileCache(settings.compile_cache, [m.digest for m in plan.models],
                                 [m.name for m in plan.models], settings.device, precision_of(settings), settings.s3)
            cache.load()
        self.models = {info.uri: runner(info, settings, cache) for info in plan.models}

    def __call__(self, batch: dict) -> pa.Table:
        plan, primary = self.plan, self.plan.primary
        n = len(batch["source_uri"])
        errors = [str(e) or None for e in batch["error"]]
        ok = np.flatnonzero([e is None for e in errors])
        rows: list[dict] = [{} for _ in range(n)]   # the model-dependent columns of each row
        if len(ok) and primary.segmenter:
            self._segment(primary, batch, ok, rows)
        elif len(ok):
            probs = _numpy(self.models[primary.uri].probabilities(self._images(primary, batch, ok)))
            prefix = "gate_prob_" if plan.cascade else "prob_"
            flagged: list[tuple[int, list[bool]]] = []
            for j, i in enumerate(ok):
                labels, defect = classify(primary, probs[j])
                row = rows[i]
                row.update({prefix + column_name(c): float(probs[j, k]) for k, c in enumerate(primary.classes)})
                if not plan.cascade:
                    row.update(labels=labels, any_defect=defect)
                    continue
                row["flagged"] = defect
                if defect:
                    flagged.append((int(i), gate_classes(primary, plan.segmenter, labels)))
                else:        # the gate says no defect: empty masks, the segmenter never sees it
                    for c in map(column_name, plan.segmenter.classes):
                        row[f"rle_{c}"], row[f"area_{c}"] = "", 0
                    row.update(labels=[], any_defect=False)
            if flagged:
                self._segment(plan.segmenter, batch, np.array([i for i, _ in flagged]), rows,
                              gates=[g for _, g in flagged])
        ok_set = set(ok.tolist())
        base = {"image_id": [str(v) for v in batch["image_id"]],
                "source_uri": [str(v) for v in batch["source_uri"]],
                "model": [plan.model_name] * n, "checkpoint": [plan.digest] * n,
                "scored_at": [dt.datetime.now(dt.timezone.utc)] * n,
                "height": [int(v) if i in ok_set else None for i, v in enumerate(batch["height"])],
                "width": [int(v) if i in ok_set else None for i, v in enumerate(batch["width"])],
                "error": errors}
        for k, name in enumerate(input_stats.STATS):
            base[name] = [float(v) if i in ok_set else None for i, v in enumerate(batch["input_stats"][:, k])]
        data = {f.name: base[f.name] if f.name in base else [r.get(f.name) for r in rows] for f in self.schema}
        return pa.Table.from_pydict(data, schema=self.schema)

    def _images(self, info: ModelInfo, batch: dict, idx: np.ndarray) -> np.ndarray:
        """uint8 NHWC images of rows ``idx`` for this model's input (no copy when every row is wanted)."""
        images = batch[f"image_{self.plan.input_index(info)}"]
        return images if len(idx) == len(images) else images[idx]

    def _segment(self, info: ModelInfo, batch: dict, idx: np.ndarray, rows: list[dict],
                 gates: list[list[bool]] | None = None) -> None:
        """Masks at each sheet's original size, their RLE and area; a class the gate did not pass is empty."""
        probs = self.models[info.uri].probabilities(self._images(info, batch, idx))
        names = [column_name(c) for c in info.classes]
        flat = probs.reshape(*probs.shape[:2], -1)
        peaks = flat.max(2) if isinstance(flat, np.ndarray) else _numpy(flat.amax(2))
        for j, i in enumerate(idx):
            masks = model_io.masks(probs[j], int(batch["height"][i]), int(batch["width"][i]),
                                   info.thresholds, self.plan.min_area)
            row, found = rows[i], []
            for c, (name, mask) in enumerate(zip(names, masks)):
                area = int(mask.sum()) if gates is None or gates[j][c] else 0
                row[f"prob_{name}"] = float(peaks[j, c])
                row[f"rle_{name}"], row[f"area_{name}"] = (rle.encode(mask) if area else ""), area
                if area:
                    found.append(info.classes[c])
            row.update(labels=found, any_defect=bool(found))


def runner(info: ModelInfo, settings: ActorSettings, cache: CompileCache | None):
    """What runs ``info`` in this actor: its members (an ensemble), ONNX Runtime, or PyTorch."""
    if info.members:
        return EnsembleModel(info, settings, cache)
    return ExportedModel(info, settings) if info.exported else TorchModel(info, settings, cache)


class EnsembleModel:
    """An ensemble's members, each run as it would run alone; their probabilities averaged. Where the
    ensemble routes clipped images, those (more than ``route_above`` of their pixels black) go to its
    route's model alone, and only those: the members never see them."""

    def __init__(self, info: ModelInfo, settings: ActorSettings, cache: CompileCache | None):
        self.members = [runner(m, settings, cache) for m in info.members]
        self.route = runner(info.route, settings, cache) if info.route else None
        self.above = info.route_above

    def probabilities(self, images: np.ndarray):
        if self.route is None:
            return self._average(images)
        clipped = ensemble.black_share(images) > self.above
        if not clipped.any():
            return self._average(images)
        if clipped.all():
            return self.route.probabilities(images)
        out = _numpy(self._average(images[~clipped]))
        full = np.empty((len(images), *out.shape[1:]), out.dtype)
        full[~clipped], full[clipped] = out, _numpy(self.route.probabilities(images[clipped]))
        return full

    def _average(self, images: np.ndarray):
        return sum(m.probabilities(images) for m in self.members) / len(self.members)


def precision_of(settings: ActorSettings) -> str:
    """``score.precision`` with ``auto`` resolved: bf16-mixed on GPU, fp32 on CPU."""
    if settings.precision != "auto":
        return settings.precision
    return "bf16-mixed" if settings.device.startswith("cuda") else "fp32"


def _numpy(x) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else x.cpu().numpy()


class ExportedModel:
    """An exported model (``.onnx``, ``jobs/export.py``) in ONNX Runtime, as the actor runs it."""

    def __init__(self, info: ModelInfo, settings: ActorSettings):
        self.info, self.model = info, onnx_model.load(info.uri, settings.s3, settings.threads, settings.device)
        if settings.device == "cuda" and "CUDAExecutionProvider" not in self.model.providers:
            log.warning("%s: this onnxruntime has no CUDA provider; the model runs on the CPU "
                        "(install onnxruntime-gpu on GPU nodes)", info.name)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """(N, C), or (N, C, h, w) for segmenters, of uint8 NHWC images at the model's input size
        (averaged over the test-time views, where ``score.tta`` asks)."""
        return model_io.with_tta(self.model, images, self.info.tta, 1, self.info.segmenter)


class TorchModel:
    """A checkpoint's ``nn.Module`` on the actor's device: precision, ``score.compile``, and batches
    that run out of GPU memory split in halves."""

    def __init__(self, info: ModelInfo, settings: ActorSettings, cache: CompileCache | None):
        import torch

        from steelray import checkpoint

        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.torch, self.info, self.device = torch, info, torch.device(settings.device)
        self.pad_to = settings.batch if settings.compile else 0
        self.fits = 0  # at most this many images at once (it ran out of GPU memory); 0: any
        precision = precision_of(settings)
        self.autocast = precision == "bf16-mixed"
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # every batch has the same shape: pick the fastest kernels once
        module, _ = checkpoint.load_model(info.uri, settings.s3, settings.device)
        module = module.to(memory_format=torch.channels_last, dtype=self.dtype)
        self.module = CompiledModel(module, info.uri, cache) if settings.compile else module

    def probabilities(self, images: np.ndarray):
        """Probabilities for uint8 NHWC images: (N, C), or (N, C, h, w) for segmenters. Where the
        model runs out of GPU memory on a batch, it runs on halves of it and keeps that smaller size
        for the rest of the job (logged): the default batch can suit a large GPU without failing the
        job on a small one."""
        torch = self.torch
        with warnings.catch_warnings():  # Ray hands out read-only arrays; nothing here writes to them
            warnings.simplefilter("ignore", UserWarning)
            x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2)  # NCHW view with channels_last strides
        n, parts, start = len(x), [], 0
        while start < n:
            size = min(n - start, (self.fits or n))
            try:
                parts.append(self._run(x[start:start + size]))
            except torch.cuda.OutOfMemoryError:
                if size == 1:
                    raise
                self.fits = size // 2
                torch.cuda.empty_cache()
                log.warning("%s: a batch of %d images ran out of GPU memory; running %d at a time from now on "
                            "(score.batch_size=%d would start there)", self.info.name, size, size // 2, size // 2)
                continue
            start += size
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _run(self, x):
        """The model on at most one model batch already on the device (padded when compiled), each
        test-time view in turn (``score.tta``), averaged there."""
        torch = self.torch
        n = len(x)
        if self.pad_to:
            size = padded_size(n, min(self.pad_to, self.fits or self.pad_to))
            if n < size:
                x = torch.cat([x, x.new_zeros((size - n, *x.shape[1:]))])
        info = self.info

        def forward(view):
            return model_io.probabilities(self.module(model_io.model_input(view, info.preprocess, self.dtype))[:n],
                                          info.task)

        with torch.inference_mode(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            return model_io.with_tta(forward, x, info.tta, 2, info.segmenter)
