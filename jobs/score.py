"""Score sheet images with a trained checkpoint into a Parquet dataset (the nightly job).

    python jobs/score.py --input s3://plant/incoming/2026-11-22/ --checkpoint s3://models/neu/best \\
        --output s3://plant/predictions/
    python jobs/score.py --input manifest.txt --checkpoint runs/cls/epoch-0010 \\
        --segmenter runs/seg/epoch-0030 --output predictions/ score.batch_size=32
    ray job submit --working-dir . -- python jobs/score.py --input ... --checkpoint ... --output ...

--input is a folder/prefix (every file under it is an input), a manifest file (.txt: one path or URI
per line; .csv: a uri/path/image column; relative paths resolved next to the manifest), or one
image. Every input becomes exactly one row: a prediction, or an error saying what is wrong with that
file. Re-running skips what the output already holds for the same checkpoint, error rows included;
with --retry-errors (after an S3 outage, say) those inputs are scored again and their error rows
replaced. Settings: `score.*` and `s3.*` keys, from --config YAML and/or key=value overrides (see
steelray/config.py, ScoreConfig).

Exit status: 0 done, 1 the output failed verification, 2 bad arguments or checkpoint, 3 another job
with the same model is writing the output (it names that job; nothing was scored).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from steelray import config  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", help="folder or s3:// prefix of images, a manifest file (.txt/.csv), or one image")
    p.add_argument("--checkpoint", help="classifier or segmenter checkpoint folder (local or s3://)")
    p.add_argument("--segmenter", help="segmenter checkpoint: cascade behind the --checkpoint classifier")
    p.add_argument("--output", help="Parquet dataset root (local or s3://), partitioned by run_date")
    p.add_argument("--retry-errors", action="store_true",
                   help="score again the inputs whose row is an error (after an S3 outage, say); "
                        "their error rows are replaced (score.retry_errors=true)")
    p.add_argument("--config", help="YAML with score: and s3: sections")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. score.batch_size=32")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    flags = [f"score.{k}={v}" for k in ("input", "checkpoint", "segmenter", "output")
             if (v := getattr(args, k))] + ["score.retry_errors=true"] * args.retry_errors
    from steelray import score

    try:
        job = config.load(args.config, flags + args.overrides, config.ScoreJob)
        summary = score.run(job)
    except (config.ConfigError, FileNotFoundError) as e:
        print(f"score: {e}", file=sys.stderr)
        return 2
    except score.ScoreError as e:
        print(f"score: {e}", file=sys.stderr)
        return 1 if isinstance(e, score.VerificationError) else 3 if isinstance(e, score.OutputBusy) else 2
    for line in summary.lines():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
