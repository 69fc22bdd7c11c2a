"""Does the header probe (``images.probe_image``: PIL's header parse plus ``images.jpeg_structure_error``)
reject every JPEG that libjpeg rejects? Random damage to real sheets, side by side: libjpeg's full
decode (through PIL, as the decode tasks use it) against the probe.

    .ci/in-venv python benchmarks/jpeg_check.py [--n 20000] [--seed 1] [--where anywhere|header]

Why: the structure check runs before every decode, so that a file whose structure is broken is an
error row and never a damaged picture scored (and a decoder laxer than libjpeg, as nvJPEG is, could
rely on it alone). Damage: random bytes over 1-2,000 bytes, a deletion or an
insertion, anywhere after the first eighth of the file (``anywhere``) or 1-3 bytes in the first 800
(``header``, where the tables are). Sources: the Severstal sample, NEU images and re-encodings of three
sheets (progressive, restart markers, optimised tables, EXIF, RGB 4:4:4). Also times check, header
probe and full decode per Severstal sheet.
"""

import argparse
import glob
import io
import os
import time
import warnings

import numpy as np
from PIL import Image

from steelray import images, synth

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def libjpeg_rejects(blob: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(blob)) as im:
            im.draft("L", im.size)
            im.convert("L")
        return False
    except Exception:  # OSError, SyntaxError, DecompressionBombError...: rejected either way
        return True


def probe_rejects(blob: bytes) -> bool:
    """PIL reads the header, then the structure check: no decode."""
    try:
        images.probe_image(blob)
        return False
    except images.DataError:
        return True


def sources() -> tuple[list[bytes], list[bytes]]:
    sev = [open(f, "rb").read() for f in sorted(glob.glob(f"{SHARED}/severstal-sample/train_images/*.jpg"))]
    neu = [open(f, "rb").read() for f in sorted(glob.glob(f"{SHARED}/neu-det/images/*.jpg"))]
    if not sev or not neu:
        raise SystemExit(f"needs the real images under {SHARED} (severstal-sample, neu-det)")
    variants = []
    for blob in sev[:3]:
        im = Image.open(io.BytesIO(blob))
        for kw in [dict(progressive=True), dict(optimize=True, quality=95), dict(restart_marker_blocks=4),
                   dict(restart_marker_rows=1), dict(progressive=True, restart_marker_rows=1),
                   dict(exif=b"Exif\x00\x00" + bytes(range(256)) * 4), dict(comment=b"\xff\xd9\xff\xda")]:
            out = io.BytesIO()
            im.save(out, format="JPEG", **kw)
            variants.append(out.getvalue())
        for kw in [dict(subsampling=0), dict(progressive=True)]:
            out = io.BytesIO()
            im.convert("RGB").save(out, format="JPEG", **kw)
            variants.append(out.getvalue())
    return sev, neu + variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--where", choices=["anywhere", "header"], default="anywhere")
    args = parser.parse_args()
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    sev, others = sources()
    sound = [i for i, b in enumerate(sev + others) if probe_rejects(b) or libjpeg_rejects(b)]
    print(f"undamaged files: {len(sev + others)}, flagged by either: {len(sound)}")
    pool, rng = sev + others[-30:] + others[:50], np.random.default_rng(args.seed)
    counts = {"both": 0, "libjpeg only": 0, "probe only": 0, "neither": 0}
    for _ in range(args.n):
        blob = synth.damaged(pool[rng.integers(len(pool))], rng, args.where)
        lib, chk = libjpeg_rejects(blob), probe_rejects(blob)
        counts["both" if lib and chk else "libjpeg only" if lib else "probe only" if chk else "neither"] += 1
    print(f"{args.n} damaged files ({args.where}, seed {args.seed}): rejected by", counts)
    for name, fn in [("structure check", images.jpeg_structure_error), ("header probe", lambda b: images.probe_image(b)),
                     ("full decode", lambda b: images.decode_image(b, 1))]:
        start = time.perf_counter()
        for _ in range(20):
            for blob in sev:
                fn(blob)
        print(f"{name}: {(time.perf_counter() - start) / (20 * len(sev)) * 1e3:.3f} ms per Severstal sheet")


if __name__ == "__main__":
    main()
