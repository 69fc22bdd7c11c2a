"""The main job on the embedded default: no data or cluster needed.

Generates a small synthetic Severstal-format set, reads it back through the data layer exactly as
training will (manifest, validation, split, decoding) and prints where every output went.

    python jobs/demo.py [--out DIR] [--n 32]

Training and scoring join this path as those jobs land (see the README).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from steelray import config, data, synth  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "severstal_multilabel.yaml")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "steelray-demo"),
                   help="folder for everything the demo writes (default: %(default)s)")
    p.add_argument("--n", type=int, default=32, help="synthetic sheets to generate (default 32)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    out = os.path.abspath(args.out)

    written = synth.make_severstal(os.path.join(out, "data"), args.n, args.seed)
    print(f"[1/3] generated {written.count} synthetic sheets ({written.defect_free} defect-free) "
          f"-> {written.images}")

    cfg = config.load(CONFIG, [f"data.root={written.root}", f"data.seed={args.seed}"])
    config.save(cfg, os.path.join(out, "config.yaml"))
    manifest = data.build_manifest(cfg)
    train, val = data.split(manifest, cfg.data)
    manifest_uri = os.path.join(out, "manifest.parquet")
    manifest.records.to_parquet(manifest_uri, index=False)
    print(f"[2/3] manifest: {manifest.summary()}")
    print(f"      split (seed {cfg.data.seed}): {len(train)} train / {len(val)} validation")

    first = data.load_image(val.records["uri"].iloc[0], cfg.data.in_chans, cfg.s3)
    print(f"[3/3] decoded {val.records['image_id'].iloc[0]} as {first.shape[0]}x{first.shape[1]}x{first.shape[2]} "
          f"(in_chans={cfg.data.in_chans})")

    print("\noutputs:")
    print(f"  images     {written.images}")
    print(f"  labels     {written.labels_csv}")
    print(f"  manifest   {manifest_uri}")
    print(f"  config     {os.path.join(out, 'config.yaml')}")
    print(f"done in {time.perf_counter() - start:.1f}s. Not yet in this path: training (jobs/train.py) and "
          f"scoring (jobs/score.py) are still to come.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
