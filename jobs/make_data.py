"""Generate a synthetic steel-defect data set (Severstal or NEU format) to a folder or s3:// prefix.

    python jobs/make_data.py --out /tmp/sheets --n 200                 # Severstal: train.csv + train_images/
    python jobs/make_data.py --format neu --out s3://bucket/neu --n 50  # NEU: 50 per class, images/ + labels.csv

Settings: `synth.*` (each option below sets one) and `s3.*`; S3 endpoint and credentials otherwise
come from the standard AWS environment variables (AWS_ENDPOINT_URL, ...).
"""

from __future__ import annotations

import os
import re
import sys

from steelray import cli, config, synth

EXIT_CODES = {cli.DONE: "written", cli.BAD_ARGUMENTS: "bad arguments"}
OPTIONS = ("format", "out", "n", "seed", "defect_free_share", "class_freq", "multi_share", "workers", "montage")


def main(argv=None) -> int:
    p = cli.parser(__doc__, EXIT_CODES, config_help="YAML with synth: and s3: sections (optional)")
    p.add_argument("--format", choices=["severstal", "neu"],
                   help="severstal (default): 1600x256 sheets with RLE masks; neu: 200x200 images of 6 classes")
    p.add_argument("--out", help="output folder or s3:// prefix")
    p.add_argument("--n", help="severstal: number of sheets; neu: images per class (default 100)")
    p.add_argument("--seed", help="same seed, same images (default 0)")
    p.add_argument("--defect-free-share", help=f"severstal: share of sheets without defects "
                                                f"(default {synth.DEFECT_FREE_SHARE})")
    p.add_argument("--class-freq", help="severstal: relative frequency of classes 1,2,3,4 among defects "
                                        f"(default {','.join(map(str, synth.CLASS_FREQ))}, close to Severstal's skew)")
    p.add_argument("--multi-share", help=f"severstal: share of defective sheets with a second class "
                                          f"(default {synth.MULTI_SHARE})")
    p.add_argument("--workers", help="processes (default: CPU count, at most 8)")
    p.add_argument("--montage", help="also save a PNG montage of the first images here")
    args = p.parse_args(argv)
    flags = [f"synth.{k}={v}" for k in OPTIONS if (v := getattr(args, k)) is not None]
    flags = [f"synth.class_freq=[{f.split('=', 1)[1]}]" if f.startswith("synth.class_freq=") else f for f in flags]
    try:
        job = cli.load(args, config.SynthJob, flags)
        sc = job.synth
        if not sc.out:
            raise config.ConfigError("synth.out: required (--out, a folder or s3:// prefix)")
        if sc.format == "severstal":
            written = synth.make_severstal(sc.out, sc.n, sc.seed, defect_free_share=sc.defect_free_share,
                                           class_freq=tuple(sc.class_freq), multi_share=sc.multi_share,
                                           s3=job.s3, workers=sc.workers or None)
        else:
            written = synth.make_neu(sc.out, sc.n, sc.seed, s3=job.s3, workers=sc.workers or None)
    except (config.ConfigError, ValueError) as e:
        said = str(e)
        for k in OPTIONS:  # name the option that sets the key, as the user typed it
            said = re.sub(rf"(synth\.{k}(\[\d+\])?):", rf"\1 (--{k.replace('_', '-')}):", said)
        print(f"make_data: {said}", file=sys.stderr)
        return cli.BAD_ARGUMENTS
    print(f"wrote {written.count} {sc.format} images to {written.images}")
    print(f"labels: {written.labels_csv}")
    print("per class: " + ", ".join(f"{c}: {n}" for c, n in written.per_class.items())
          + (f"; defect-free: {written.defect_free}" if sc.format == "severstal" else ""))
    if sc.montage:
        save_montage(sc, sc.montage)
        print(f"montage: {sc.montage}")
    return cli.DONE


def save_montage(args: config.SynthConfig, path: str) -> None:
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
