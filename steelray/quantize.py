"""INT8 for the line: static quantisation of an exported model with ONNX Runtime's own tooling
(QDQ format, per-channel weights, activations calibrated on sheets of the training split).

``export.run`` calls it and then gates the result on accuracy; nothing here judges the model.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Iterable

import numpy as np

from steelray import onnx_model

def calibration_sample(uris: list[str], n: int, seed: int = 0) -> list[str]:
    """``n`` of ``uris`` (all when fewer), drawn at random with ``seed``, in their listed order."""
    if n >= len(uris):
        return list(uris)
    keep = set(random.Random(seed).sample(range(len(uris)), n))
    return [u for i, u in enumerate(uris) if i in keep]


def quantize(model: bytes, batches: Iterable[np.ndarray], method: str = "minmax") -> bytes:
    """The INT8 (QDQ) model of an exported fp32 ``model``, its activations' ranges from ``batches``.
    Per-channel int8 weights, uint8 activations (ONNX Runtime's defaults for x86 and ARM CPUs).
    MinMax keeps only each tensor's per-channel extremes per batch, so large sheets do not pile up."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]

    class Reader(CalibrationDataReader):  # one pass over the batches is all static calibration makes
        def __init__(self):
            self.batches = iter(batches)

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {onnx_model.INPUT: batch}

    reader = Reader()
    with tempfile.TemporaryDirectory() as tmp:
        src, prepared, out = (os.path.join(tmp, n) for n in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        with open(src, "wb") as f:
            f.write(model)
        quant_pre_process(src, prepared)  # shape inference and graph clean-up, as ONNX Runtime advises
        # The last softmax or sigmoid stays in float: quantised, probabilities would come in steps of 1/255.
        last = [n.name for n in onnx.load(prepared).graph.node if n.op_type in ("Softmax", "Sigmoid")]
        quantize_static(prepared, out, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=calibrate,
                        nodes_to_exclude=last)
        with open(out, "rb") as f:
            return f.read()
