"""Generate a synthetic steel-defect data set (Severstal or NEU format) to a folder or s3:// prefix.

    python jobs/make_data.py --out /tmp/sheets --n 200                 # Severstal: train.csv + train_images/
    python jobs/make_data.py --format neu --out s3://bucket/neu --n 50  # NEU: 50 per class, images/ + labels.csv

S3 endpoint and credentials come from the standard AWS environment variables (AWS_ENDPOINT_URL, ...).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from steelray import synth  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", choices=["severstal", "neu"], default="severstal",
                   help="severstal: 1600x256 sheets with RLE masks; neu: 200x200 images of 6 classes")
    p.add_argument("--out", required=True, help="output folder or s3:// prefix")
    p.add_argument("--n", type=int, default=100,
                   help="severstal: number of sheets; neu: images per class (default 100)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same images (default 0)")
    p.add_argument("--defect-free-share", type=float, default=synth.DEFECT_FREE_SHARE,
                   help=f"severstal: share of sheets without defects (default {synth.DEFECT_FREE_SHARE})")
    p.add_argument("--class-freq", default=",".join(map(str, synth.CLASS_FREQ)),
                   help="severstal: relative frequency of classes 1,2,3,4 among defects "
                        f"(default {','.join(map(str, synth.CLASS_FREQ))}, close to Severstal's skew)")
    p.add_argument("--multi-share", type=float, default=synth.MULTI_SHARE,
                   help=f"severstal: share of defective sheets with a second class (default {synth.MULTI_SHARE})")
    p.add_argument("--workers", type=int, default=None, help="processes (default: CPU count, at most 8)")
    p.add_argument("--montage", default=None, help="also save a PNG montage of the first images here")
    args = p.parse_args(argv)
    try:
        args.class_freq = tuple(float(x) for x in args.class_freq.split(","))
    except ValueError:
        p.error(f"--class-freq: expected 4 comma-separated numbers, got {args.class_freq!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.format == "severstal":
            written = synth.make_severstal(args.out, args.n, args.seed, defect_free_share=args.defect_free_share,
                                           class_freq=args.class_freq, multi_share=args.multi_share,
                                           workers=args.workers)
        else:
            written = synth.make_neu(args.out, args.n, args.seed, workers=args.workers)
    except ValueError as e:
        print(f"make_data: {e}", file=sys.stderr)
        return 2
    print(f"wrote {written.count} {args.format} images to {written.images}")
    print(f"labels: {written.labels_csv}")
    print("per class: " + ", ".join(f"{c}: {n}" for c, n in written.per_class.items())
          + (f"; defect-free: {written.defect_free}" if args.format == "severstal" else ""))
    if args.montage:
        save_montage(args, args.montage)
        print(f"montage: {args.montage}")
    return 0


def save_montage(args: argparse.Namespace, path: str) -> None:
    from PIL import Image

    if args.format == "severstal":
        sheets = [synth.severstal_sheet(args.seed, i, args.defect_free_share, args.class_freq, args.multi_share)
                  for i in range(min(args.n, 8))]
        tiles = [synth.overlay(image, masks) for image, masks in sheets]
        gap = 6
        canvas = synth.montage([t[:, :, 0] for t in tiles], 1, gap)
        rgb = Image.fromarray(canvas).convert("RGB")
        for i, t in enumerate(tiles):
            rgb.paste(Image.fromarray(t), (0, i * (t.shape[0] + gap)))
    else:
        images = [synth.neu_image(args.seed, i, c) for c in synth.NEU_CLASSES for i in range(1, 7)]
        rgb = Image.fromarray(synth.montage(images, 6))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rgb.save(path)


if __name__ == "__main__":
    sys.exit(main())
