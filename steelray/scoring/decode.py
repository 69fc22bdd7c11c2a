"""The CPU stage of the scoring pipeline: read each input's bytes (threads, S3 retries with backoff),
decode and check them, measure them (``input_stats``), and resize them as the checkpoint's
preprocessing says. Every failure becomes the row's ``error``. Imports no torch: these workers stay light."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from steelray import input_stats, model_io, storage
from steelray.images import SEVERSTAL_SIZE, DataError, decode_image
from steelray.storage import S3Config

# What a decode task holds besides its images: the worker process itself (Python, Ray, pyarrow, PIL,
# OpenCV; no torch), and an S3 client where the inputs are on S3 (docs/benchmarks.md).
DECODE_WORKER_BYTES = 96 * 2**20
S3_CLIENT_BYTES = 64 * 2**20


def read_all(uris: list[str], s3: S3Config | None, retries: int, threads: int) -> list[bytes | str]:
    """Each URI's bytes, or the error message saying why there are none."""
    def read(uri: str) -> bytes | str:
        try:
            return storage.read_bytes(uri, s3, retries)
        except FileNotFoundError:
            return f"{uri}: not found (removed after it was listed, or never there)"
        except Exception as e:  # after the client's retries with backoff
            return f"{uri}: read failed after {retries} retries: {type(e).__name__}: {e}"

    with ThreadPoolExecutor(min(threads, len(uris)) or 1) as pool:
        return list(pool.map(read, uris))


def read_and_decode(batch: dict, *, inputs: list[dict], expect_size, s3: S3Config | None,
                    retries: int, threads: int) -> dict:
    """Bytes -> uint8 (N, H, W, C) per model input (``image_<k>``), resized by ``model_io.resize``, and
    (N, S) ``input_stats`` of each image at its own size. A row whose input could not be read, decoded
    or is of the wrong size has its ``error`` set, zeros for pixels and NaN for statistics."""
    uris = [str(u) for u in batch["source_uri"]]
    pres = [model_io.Preprocess.from_dict(p) for p in inputs]
    n = len(uris)
    images = [np.zeros((n, *p.size, p.in_chans), np.uint8) for p in pres]
    height, width = np.zeros(n, np.int32), np.zeros(n, np.int32)
    stats = np.full((n, len(input_stats.STATS)), np.nan, np.float32)
    errors = [""] * n
    for i, (uri, blob) in enumerate(zip(uris, read_all(uris, s3, retries, threads))):
        if isinstance(blob, str):
            errors[i] = blob
            continue
        decoded: dict[int, np.ndarray] = {}
        try:
            for k, p in enumerate(pres):
                if p.in_chans not in decoded:
                    decoded[p.in_chans] = decode_image(blob, p.in_chans, uri)
                img = decoded[p.in_chans]
                h, w = img.shape[:2]
                if expect_size and (h, w) != tuple(expect_size):
                    raise DataError(f"{uri}: unexpected size {w}x{h} (width x height), expected "
                                    f"{expect_size[1]}x{expect_size[0]}")
                images[k][i] = model_io.resize(img, p.size)
            height[i], width[i] = h, w
            stats[i] = input_stats.sheet_stats(next(iter(decoded.values())))
        except DataError as e:
            errors[i] = str(e)
    out = {"image_id": np.asarray(batch["image_id"], dtype=object), "source_uri": np.asarray(uris, dtype=object),
           "height": height, "width": width, "input_stats": stats, "error": np.asarray(errors, dtype=object)}
    for k, arr in enumerate(images):
        out[f"image_{k}"] = arr
    return out


def task_memory(inputs: list[model_io.Preprocess], expect_size, decode_batch: int, s3_inputs: bool) -> int:
    """Bytes a decode task holds: the worker itself plus its images decoded at full size (RGB at
    worst) and resized, twice over for the copies on the way out. Reserving it keeps Ray Data from
    fusing decoding into the model actor, where one process would decode and predict in turn."""
    h, w = expect_size or SEVERSTAL_SIZE
    per_image = h * w * 3 + sum(p.size[0] * p.size[1] * p.in_chans for p in inputs)
    return DECODE_WORKER_BYTES + S3_CLIENT_BYTES * s3_inputs + 2 * decode_batch * per_image
