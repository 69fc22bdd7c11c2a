"""Image files into pixels: decoding, the checks that name what is wrong with a file (empty, not an
image, truncated, a broken JPEG structure, more than 8 bits per pixel), and the sizes of known sheets.

Training, evaluation and scoring all decode through ``decode_image``; it never imports torch, so
scoring's decode workers stay light.
"""

from __future__ import annotations

import bisect
import contextlib
import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from steelray import storage
from steelray.storage import S3Config

SEVERSTAL_SIZE = (256, 1600)  # (height, width) of every Severstal sheet and of its masks
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


class DataError(ValueError):
    """Bad input data; the message names the file or row and what is wrong."""


# PIL modes of more than 8 bits per pixel (16-bit PNG/TIFF from line-scan cameras, 32-bit, float):
# PIL's conversion to 8-bit clips them (a 12-bit sheet comes out almost all white), so they are refused.
_DEEP_MODES = {"I;16": "16-bit", "I;16L": "16-bit", "I;16B": "16-bit", "I;16N": "16-bit", "I": "32-bit integer",
               "F": "32-bit float"}


@contextlib.contextmanager
def _opened(data: bytes, name: str):
    """The PIL image of ``data``; what PIL cannot read, a JPEG whose structure is broken, and an image
    of more than 8 bits per pixel become a DataError naming ``name``."""
    if not data:
        raise DataError(f"{name}: empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format == "JPEG" and (problem := jpeg_structure_error(data)):
                raise OSError(f"corrupt JPEG data: {problem}")
            if im.mode in _DEEP_MODES:
                raise DataError(f"{name}: {_DEEP_MODES[im.mode]} greyscale {im.format} (mode {im.mode}): the "
                                "models take 8-bit images and converting here would clip it; scale it to "
                                "8 bits (0-255) first")
            yield im
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError(f"{name}: not an image (unrecognised format, {len(data)} bytes)") from None
    except Image.DecompressionBombError as e:  # a corrupt header can claim billions of pixels
        raise DataError(f"{name}: unreadable image ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{name}: unreadable or truncated image ({e})") from None


def decode_image(data: bytes, in_chans: int = 1, name: str = "image") -> np.ndarray:
    """Decode image bytes to a (H, W, in_chans) uint8 array.

    Grayscale stored as RGB (both real sets are R=G=B) becomes one channel for ``in_chans=1``;
    a one-channel image is repeated for ``in_chans=3``. Raises DataError naming ``name``.
    """
    with _opened(data, name) as im:
        if in_chans == 1 and im.format == "JPEG":
            im.draft("L", im.size)  # let libjpeg emit luma directly: no RGB round trip
        array = np.asarray(im.convert("L" if in_chans == 1 else "RGB"))
    return array[:, :, None] if array.ndim == 2 else array


def probe_image(data: bytes, name: str = "image") -> tuple[str, int, int]:
    """(format, height, width) from the header alone: the checks ``decode_image`` makes before it
    decodes (empty, not an image, a broken JPEG structure, more than 8 bits per pixel), raising the
    same DataError, without decoding the pixels."""
    with _opened(data, name) as im:
        return im.format or "", im.height, im.width


# --- JPEG structure -----------------------------------------------------------------------------
# libjpeg (PIL's decoder) rejects a JPEG only when its marker structure is broken: a bad table or
# header, a marker where none can be. Damage that keeps the structure decodes, with warnings, to a
# damaged picture that would be scored as if it were a sheet. ``jpeg_structure_error`` walks the
# markers without decoding, at a small fraction of a decode's cost, and names what is broken: it
# refuses whatever libjpeg refuses and some files libjpeg decodes with a warning (measured on
# damaged real sheets: benchmarks/jpeg_check.py, docs/benchmarks.md). PIL reads headers but checks
# none of this, and no library we found checks it without decoding, hence our own.

_SEQUENTIAL = {0xC0, 0xC1, 0xC3, 0xC5, 0xC7, 0xC9, 0xCB, 0xCD, 0xCF}  # each component in one scan
_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}
_LOSSLESS = {0xC3, 0xC7, 0xCB, 0xCF}  # (also sequential)
_HUFFMAN = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7}  # the others are arithmetic-coded
_SKIPPED = {0xCC, 0xDC, 0xDF, 0xFE, *range(0xE0, 0xF0)}  # DAC, DNL, EXP, COM, APPn: passed over by length
_SEGMENTS = _SEQUENTIAL | _PROGRESSIVE | _LOSSLESS | _SKIPPED | {0xC4, 0xDA, 0xDB, 0xDD}


def _codes_overflow(counts: bytes) -> bool:
    """Whether canonical Huffman codes with ``counts[l - 1]`` codes of length l run out of bit
    patterns (libjpeg also refuses the all-ones code)."""
    code = 0
    for length, count in enumerate(counts.rstrip(b"\x00"), start=1):
        code += count
        if code >= 1 << length:
            return True
        code <<= 1
    return False


def _segment_error(m: int, seg: bytes, state: dict) -> str | None:
    """What is wrong with the body ``seg`` of the segment whose marker is ``m`` (None: nothing).
    ``state`` carries the frame's components and the tables defined so far."""
    n = len(seg)
    if m in _SEQUENTIAL or m in _PROGRESSIVE:
        nf = seg[5] if n > 5 else 0
        if state["frame"] is not None:
            return "a second frame header"
        if nf == 0 or n != 6 + 3 * nf or seg[0] not in (8, 12, 16) or not (seg[3] or seg[4]):
            return "a bad frame header"
        comps = [seg[6 + 3 * i:9 + 3 * i] for i in range(nf)]  # id, sampling factors, table
        if any(not 1 <= f >> 4 <= 4 or not 1 <= f & 15 <= 4 or q > 3 for _, f, q in comps):
            return "a bad frame header"
        state["frame"], state["components"] = m, {c: q for c, _, q in comps}
        state["blocks"] = {c: (f >> 4) * (f & 15) for c, f, _ in comps}
    elif m == 0xDA:
        ns = seg[0] if n else 0
        if state["frame"] is None or not 1 <= ns <= 4 or n != 4 + 2 * ns:
            return "a bad scan header"
        ids, tables = seg[1:1 + 2 * ns:2], seg[2:2 + 2 * ns:2]
        ss, se, ah, al = seg[-3], seg[-2], seg[-1] >> 4, seg[-1] & 15
        if (not set(ids) <= state["components"].keys() or len(set(ids)) != ns
                or any(t >> 4 > 3 or t & 15 > 3 for t in tables)
                or (ns > 1 and sum(state["blocks"][c] for c in ids) > 10)):  # libjpeg's MCU limit
            return "a bad scan header"
        if state["frame"] in _PROGRESSIVE:
            if se > 63 or ss > se or (ss == 0) != (se == 0) or (ss and ns != 1) or (ah and al != ah - 1) or al > 13:
                return "bad progressive scan parameters"
            needed = [(1, t & 15) if ss else (0, t >> 4) for t in tables] if ss or not ah else []
        else:
            if state["scanned"] & set(ids):
                return "a second scan of the same component"
            needed = [(0, t >> 4) for t in tables] + [(1, t & 15) for t in tables]
        supplied = 2 if state["frame"] in _SEQUENTIAL else 0  # libjpeg's defaults for 0 and 1 (Motion JPEG)
        if state["frame"] in _HUFFMAN and any(k[1] >= supplied and k not in state["huffman"] for k in needed):
            return "a scan using a Huffman table never defined"
        if state["frame"] not in _LOSSLESS and any(state["components"][c] not in state["quant"] for c in ids):
            return "a scan using a quantisation table never defined"
        state["scanned"] |= set(ids)
    elif m == 0xC4:  # Huffman tables: class and id, 16 code counts, that many symbols
        i = 0
        while i < n:
            kind, counts = seg[i], seg[i + 1:i + 17]
            size = 17 + sum(counts)
            if i + 17 > n or kind >> 4 > 1 or kind & 15 > 3 or i + size > n or _codes_overflow(counts):
                return "a bad Huffman table"
            if kind >> 4 == 0 and state["frame"] not in _LOSSLESS and max(seg[i + 17:i + size], default=0) > 15:
                return "a bad Huffman table"  # as libjpeg's jpeg_make_d_derived_tbl: DC symbols <= 15
            state["huffman"].add((kind >> 4, kind & 15))
            i += size
    elif m == 0xDB:  # quantisation tables: precision and id, 64 values of 1 or 2 bytes
        i = 0
        while i < n:
            size = {0: 65, 1: 129}.get(seg[i] >> 4, 0)
            if not size or seg[i] & 15 > 3 or i + size > n:
                return "a bad quantisation table"
            state["quant"].add(seg[i] & 15)
            i += size
    elif m == 0xDD:
        if n != 2:
            return "a bad restart interval"
        state["restart"] = seg[0] << 8 | seg[1]
    return None


def jpeg_structure_error(data: bytes) -> str | None:
    """What breaks the marker structure of a JPEG, with its byte offset; None when the structure is
    sound, when ``data`` is no JPEG, and when it ends early (the decoder calls that truncated)."""
    data = bytes(data)
    if data[:2] != b"\xff\xd8":
        return None
    a = np.frombuffer(data, np.uint8)
    n, ends = len(data), data[-2:] == b"\xff\xd9"
    ff = np.flatnonzero(a[:-1] == 0xFF)
    after = a[ff + 1]
    is_rst = (after >= 0xD0) & (after <= 0xD7)
    markers = ff[(after != 0) & (after != 0xFF) & ~is_rst].tolist()  # not stuffed zeros, fill, restarts
    restarts, restart_codes = ff[is_rst], after[is_rst]
    state = {"frame": None, "components": {}, "scanned": set(), "restart": 0, "huffman": set(), "quant": set()}
    pos = 2
    while True:
        while data[pos:pos + 2] == b"\xff\xff":
            pos += 1
        if data[pos:pos + 2] == b"\xff\xd9":
            return None if state["scanned"] else f"the end-of-image marker at byte {pos}, before any image data"
        if pos + 4 > n:
            return None
        if data[pos] != 0xFF:
            return f"marker expected at byte {pos}, found 0x{data[pos]:02X}"
        m, length = data[pos + 1], data[pos + 2] << 8 | data[pos + 3]
        if m not in _SEGMENTS:
            return f"marker 0xFF{m:02X} where none can be, at byte {pos}"
        if length < 2 or pos + 2 + length > n:
            return f"the segment at byte {pos} (0xFF{m:02X}) runs past the end" if ends else None
        if problem := _segment_error(m, data[pos + 4:pos + 2 + length], state):
            return f"{problem} at byte {pos}"
        pos += 2 + length
        if m == 0xDA:  # entropy-coded data, up to the next marker that is not a restart
            k = bisect.bisect_left(markers, pos)
            end = markers[k] if k < len(markers) else n
            lo, hi = np.searchsorted(restarts, [pos, end])
            codes = restart_codes[lo:hi]
            if len(codes) and (not state["restart"] or (codes != 0xD0 + np.arange(len(codes)) % 8).any()):
                return f"restart marker out of place in the scan data after byte {pos}"
            if k == len(markers):
                return None
            pos = end

def load_image(uri: str, in_chans: int = 1, s3: S3Config | None = None) -> np.ndarray:
    """Read and decode one image from a local path or s3:// URI."""
    try:
        data = storage.read_bytes(uri, s3)
    except FileNotFoundError:
        raise DataError(f"{uri}: image missing") from None
    return decode_image(data, in_chans, uri)
