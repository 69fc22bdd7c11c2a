"""An exported model (``jobs/export.py``) run with ONNX Runtime: what the scoring actors
(``score.engine=onnxruntime``), evaluation, the export's own checks and the line-side scorer call.
Imports neither torch nor Ray.

An exported model is one ``.onnx`` file:
    graph     ``images``: uint8 (N, H, W, C) sheets at the checkpoint's input size (what scoring's
              decode stage gives its model actors), the checkpoint's normalisation, the network, and
              ``probabilities``: (N, C) for classifiers (softmax or sigmoid), (N, C, h, w) for segmenters
    metadata  ``steelray.meta``: the checkpoint's meta.json (task, classes, thresholds, minimum areas,
              preprocessing, training config) and an ``export`` entry (precision, the source
              checkpoint, its parity and accuracy-gate figures), so the file decides as the checkpoint does
"""

from __future__ import annotations

import json

import numpy as np

from steelray import storage
from steelray.storage import S3Config

META_KEY = "steelray.meta"
INPUT, OUTPUT = "images", "probabilities"
SUFFIX = ".onnx"


class ExportedModelError(ValueError):
    """A file that is not an exported steelray model; the message names it."""


def is_exported(uri: str) -> bool:
    """Whether ``uri`` names an exported model (an ``.onnx`` file) rather than a checkpoint folder."""
    return str(uri).lower().rstrip("/").endswith(SUFFIX)


class OnnxModel:
    """``OnnxModel(data)(images) -> probabilities``: an exported model in an ONNX Runtime session.
    ``threads``: intra-op threads (0: ONNX Runtime's default, every core); ``device`` ``cuda`` uses
    the CUDA provider where this onnxruntime build has it (else the CPU, with a warning in the log)."""

    def __init__(self, data: bytes, name: str = "model.onnx", threads: int = 0, device: str = "cpu"):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        providers = ["CPUExecutionProvider"]
        if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(data, opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for a file it cannot load
            raise ExportedModelError(f"{name}: not an ONNX model ONNX Runtime can load: {type(e).__name__}: "
                                     f"{str(e).strip()[:300]}") from None
        custom = self.session.get_modelmeta().custom_metadata_map
        if META_KEY not in custom:
            raise ExportedModelError(f"{name}: an ONNX model, but not one jobs/export.py wrote (no {META_KEY} "
                                     "in its metadata): export the checkpoint with jobs/export.py")
        self.meta: dict = json.loads(custom[META_KEY])
        self.name = name
        self.providers = self.session.get_providers()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """float32 probabilities of uint8 (N, H, W, C) images at the model's input size."""
        return self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(images, dtype=np.uint8)})[0]


def load(uri: str, s3: S3Config | None = None, threads: int = 0, device: str = "cpu") -> OnnxModel:
    """The exported model at ``uri`` (local or s3://)."""
    return OnnxModel(read(uri, s3), uri, threads, device)


def read(uri: str, s3: S3Config | None = None) -> bytes:
    try:
        return storage.read_bytes(uri, s3)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: no such exported model (write one with jobs/export.py)") from None


def read_meta(uri: str, s3: S3Config | None = None) -> dict:
    """The checkpoint meta (with its ``export`` entry) an exported model carries."""
    return load(uri, s3).meta
