"""Write Kaggle's Severstal submission CSV (ImageId,ClassId,EncodedPixels) from the scoring output.

    python jobs/export_kaggle.py --output s3://plant/predictions/ --run-date 2026-11-22 --to submission.csv

Every scored image gets one row per class (empty EncodedPixels for no defect). Rows the scoring job
recorded as errors are left out and counted on stderr: Kaggle has no way to say "unreadable".
Needs a segmenter's (or cascade's) output: a classifier has no masks.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from steelray import config, score, storage  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="the scoring job's output root (local or s3://)")
    p.add_argument("--run-date", default="", help="only this run_date partition (default: all)")
    p.add_argument("--checkpoint", default="", help="only this model version (the checkpoint column), where the "
                                                  "output holds several")
    p.add_argument("--to", required=True, help="CSV to write (local or s3://)")
    p.add_argument("overrides", nargs="*", help="s3.* settings as key=value")
    args = p.parse_args(argv)
    try:
        s3 = config.load(None, args.overrides, config.ScoreJob).s3
        rows, left_out = score.kaggle_rows(score.read_output(args.output, s3, args.run_date, args.checkpoint))
    except (config.ConfigError, score.ScoreError) as e:
        print(f"export_kaggle: {e}", file=sys.stderr)
        return 2
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["ImageId", "ClassId", "EncodedPixels"])
    writer.writerows(rows)
    storage.write_text(args.to, buf.getvalue(), s3)
    images = len({r[0] for r in rows})
    print(f"wrote {len(rows)} rows for {images} image(s) to {args.to}")
    if left_out:
        print(f"left out {left_out} image(s) the scoring job could not read (see their error column)",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
