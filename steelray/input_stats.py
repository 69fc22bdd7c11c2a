"""What a sheet's pixels say about the camera, not the steel: brightness, contrast, dark and saturated
shares, sharpness. The scoring job's decode stage computes them for every sheet and stores them as
``input_*`` columns of its output; the night report compares their distribution against earlier
nights, so glare, dimming, a dirty lens or a new camera shows the first night, before the model's
probabilities (and missed defects) do.

Computed on every second row and column of the decoded image at its own size (a quarter of the
pixels: these are distributions over a night, not measurements of one sheet), before any resize.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

# column -> what it measures; pixel values on 0-1 (full scale)
STATS = {
    "input_brightness": "mean grey level, 0-1",
    "input_contrast": "standard deviation of the grey level, 0-1",
    "input_dark_share": "share of pixels below 10% of full scale (unlit, under-exposed)",
    "input_bright_share": "share of pixels at or above 98% of full scale (saturated: glare)",
    "input_sharpness": "variance of the Laplacian of the grey level (0-1 scale): falls as focus or the lens goes",
}
DARK, BRIGHT = round(0.10 * 255), round(0.98 * 255)


def fields() -> list[tuple[str, pa.DataType]]:
    """The output columns, in their order (null on a row whose image could not be read)."""
    return [(name, pa.float32()) for name in STATS]


def sheet_stats(image: np.ndarray) -> np.ndarray:
    """``STATS`` of one decoded uint8 (H, W) or (H, W, C) image, as float32 in ``STATS``' order."""
    import cv2  # where sheets are measured, not where the columns are only named (the plan, the report)

    grey = image if image.ndim == 2 else image[:, :, 0] if image.shape[2] == 1 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    grey = np.ascontiguousarray(grey[::2, ::2])
    mean, std = cv2.meanStdDev(grey)
    n = grey.size
    _, lap_std = cv2.meanStdDev(cv2.Laplacian(grey, cv2.CV_16S))  # 16-bit: exact for uint8, cheaper than float
    return np.array([mean[0, 0] / 255.0, std[0, 0] / 255.0, np.count_nonzero(grey < DARK) / n,
                     np.count_nonzero(grey >= BRIGHT) / n, (lap_std[0, 0] / 255.0) ** 2], np.float32)
