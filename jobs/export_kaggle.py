"""Write Kaggle's Severstal submission CSV (ImageId,ClassId,EncodedPixels) from the scoring output.

    python jobs/export_kaggle.py --output s3://plant/predictions/ --run-date 2026-11-22 --to submission.csv

Every scored image gets one row per class (empty EncodedPixels for no defect). Rows the scoring job
recorded as errors are left out and counted on stderr: Kaggle has no way to say "unreadable".
Needs a segmenter's (or cascade's) output: a classifier has no masks. Settings: `s3.*`.
"""

from __future__ import annotations

import csv
import io
import json
import sys

import pyarrow as pa
import pyarrow.compute as pc

from steelray import cli, config, storage
from steelray.scoring.output import read_output
from steelray.scoring.plan import CLASSES_KEY, ScoreError, column_name

EXIT_CODES = {cli.DONE: "written", cli.BAD_ARGUMENTS: "bad arguments, or an output Kaggle's format cannot hold"}


def kaggle_rows(table: pa.Table) -> tuple[list[tuple[str, str, str]], int]:
    """Kaggle submission rows (ImageId, ClassId, EncodedPixels) for every scored image and every
    class of a segmenter's output, and the number of error rows left out."""
    raw = (table.schema.metadata or {}).get(CLASSES_KEY)
    rle_cols = [c for c in table.column_names if c.startswith("rle_")]
    if not rle_cols:
        raise ScoreError("the output has no rle_* columns: Kaggle's format needs a segmenter's masks")
    versions = sorted(pc.unique(table.column("checkpoint")).to_pylist()) if table.num_rows else []
    if len(versions) > 1:   # each image would appear once per model version
        raise ScoreError(f"the output holds {len(versions)} model versions ({', '.join(versions)}): "
                         "pick one (export_kaggle.py --checkpoint DIGEST)")
    classes = json.loads(raw) if raw else [c[len("rle_"):] for c in rle_cols]
    data = table.select(["image_id", "error"] + [f"rle_{column_name(c)}" for c in classes]).to_pylist()
    rows, skipped = [], 0
    for r in sorted(data, key=lambda r: r["image_id"]):
        if r["error"] is not None:
            skipped += 1
            continue
        rows += [(r["image_id"], c, r[f"rle_{column_name(c)}"] or "") for c in classes]
    return rows, skipped


def main(argv=None) -> int:
    p = cli.parser(__doc__, EXIT_CODES, config_help="YAML with an s3: section (optional)")
    p.add_argument("--output", required=True, help="the scoring job's output root (local or s3://)")
    p.add_argument("--run-date", default="", help="only this run_date partition (default: all)")
    p.add_argument("--checkpoint", default="", help="only this model version (the checkpoint column), where the "
                                                  "output holds several")
    p.add_argument("--to", required=True, help="CSV to write (local or s3://)")
    args = p.parse_args(argv)
    try:
        s3 = cli.load(args, config.ScoreJob).s3
        rows, left_out = kaggle_rows(read_output(args.output, s3, args.run_date, args.checkpoint))
    except (config.ConfigError, ScoreError) as e:
        print(f"export_kaggle: {e}", file=sys.stderr)
        return cli.BAD_ARGUMENTS
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["ImageId", "ClassId", "EncodedPixels"])
    writer.writerows(rows)
    storage.write_text(args.to, buf.getvalue(), s3)
    print(f"wrote {len(rows)} rows for {len({r[0] for r in rows})} image(s) to {args.to}")
    if left_out:
        print(f"left out {left_out} image(s) the scoring job could not read (see their error column)",
              file=sys.stderr)
    return cli.DONE


if __name__ == "__main__":
    sys.exit(main())
