"""Score sheet images with a trained checkpoint into a Parquet dataset (the nightly job).

    python jobs/score.py --input s3://plant/incoming/2026-11-22/ --checkpoint s3://models/neu/best \\
        --output s3://plant/predictions/
    python jobs/score.py --input manifest.txt --checkpoint runs/cls/epoch-0010 \\
        --segmenter runs/seg/epoch-0030 --output predictions/ score.batch_size=32
    python jobs/score.py --config jobs/configs/score_nightly.yaml score.input=s3://plant/incoming/2026-11-22/
    python jobs/score.py --input 's3://plant/incoming/{run_date}/' score.run_date_offset=-1 ...  # last night

--input is a folder/prefix (every file under it is an input), a manifest file (.txt: one path or URI
per line; .csv: a uri/path/image column; relative paths resolved next to the manifest), or one
image; `{run_date}` in it is the night's date (score.run_date, or today in score.run_timezone plus
score.run_date_offset days), for schedulers whose command is fixed. Every input becomes exactly one row: a prediction, or an error saying what is wrong with that
file. Re-running skips what the output already holds for the same checkpoint, error rows included;
with --retry-errors (after an S3 outage, say) those inputs are scored again. Settings: `score.*` and
`s3.*` (steelray/config.py, ScoreConfig; docs/scoring.md).
"""

from __future__ import annotations

import sys

from steelray import cli, config

EXIT_CODES = {cli.DONE: "done: every input has its row",
              cli.FAILED: "the output failed verification (inputs missing or twice, named): a rerun scores the "
                          "missing ones; a second exit 1 needs a person (duplicated rows)",
              cli.BAD_ARGUMENTS: "bad arguments or checkpoint: do not retry before fixing them",
              cli.BUSY: "another job with the same model is writing this output (named), or the MLflow server "
                        "a models:/ checkpoint is looked up on cannot be reached: retry later"}


def main(argv=None) -> int:
    p = cli.parser(__doc__, EXIT_CODES, config_help="YAML with score: and s3: sections (optional)")
    p.add_argument("--input", help="folder or s3:// prefix of images, a manifest file (.txt/.csv), or one image")
    p.add_argument("--checkpoint", help="classifier or segmenter checkpoint folder (local or s3://), or "
                                        "models:/<name>@<alias> (jobs/register.py)")
    p.add_argument("--segmenter", help="segmenter checkpoint: cascade behind the --checkpoint classifier")
    p.add_argument("--output", help="Parquet dataset root (local or s3://), partitioned by run_date")
    p.add_argument("--retry-errors", action="store_true",
                   help="score again the inputs whose row is an error (score.retry_errors=true)")
    args = p.parse_args(argv)
    flags = [f"score.{k}={v}" for k in ("input", "checkpoint", "segmenter", "output")
             if (v := getattr(args, k))] + ["score.retry_errors=true"] * args.retry_errors
    from steelray import registry, tracking
    from steelray.scoring import job, lock, output, plan

    try:
        summary = job.run(cli.load(args, config.ScoreJob, flags))
    except (config.ConfigError, FileNotFoundError, registry.RegistryError) as e:
        print(f"score: {e}", file=sys.stderr)
        return cli.BAD_ARGUMENTS
    except tracking.TrackingUnavailable as e:
        print(f"score: {e}", file=sys.stderr)
        return cli.BUSY
    except plan.ScoreError as e:
        print(f"score: {e}", file=sys.stderr)
        return (cli.FAILED if isinstance(e, output.VerificationError)
                else cli.BUSY if isinstance(e, lock.OutputBusy) else cli.BAD_ARGUMENTS)
    for line in summary.lines():
        print(line)
    return cli.DONE


if __name__ == "__main__":
    sys.exit(main())
