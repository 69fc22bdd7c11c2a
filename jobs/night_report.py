"""The morning report over one night of a scoring output: one self-contained report.html, report.json
with every number on it, and review.csv (the sheets nearest the decision, for a labelling tool).

    python jobs/night_report.py --output s3://plant/predictions/            # the newest night, 7 before it
    python jobs/night_report.py --output predictions/ --night 2026-11-27 --checkpoint s3://models/sev/best
    python jobs/night_report.py --output predictions/ --checkpoint runs/prod/best --candidate runs/new/best

Volumes and error kinds, defect shares as a trend, the night's most confident defects per class, the
review list, and drift: each class's probabilities against the checkpoint's validation predictions
(kept by jobs/evaluate.py) or the nights before, each input statistic (brightness, contrast, dark and
saturated shares, sharpness) against the nights before. --candidate compares a second model version
scored into the same output on the same sheets. Written to <output>/_reports/<night>-<version>/
unless --out says where. Settings: `report.*` and `s3.*` (steelray/config.py, NightReportConfig).
"""

from __future__ import annotations

import sys

from steelray import cli, config

EXIT_CODES = {cli.DONE: "report written, nothing to alert on",
              cli.BAD_ARGUMENTS: "bad arguments, or no such output, night or version",
              cli.BUSY: "a models:/ checkpoint and the MLflow server cannot be reached: retry later",
              cli.ALERT: "report written, with alerts: a drift flag, or error rows past report.max_error_rate"}


def main(argv=None) -> int:
    p = cli.parser(__doc__, EXIT_CODES, config_help="YAML with report: and s3: sections (optional)")
    p.add_argument("--output", help="the scoring output's root (report.output)")
    p.add_argument("--night", help="run date YYYY-MM-DD (report.night; default: the newest)")
    p.add_argument("--checkpoint", help="the model's checkpoint folder or models:/<name>@<alias> (report.checkpoint), "
                                        "or give report.version")
    p.add_argument("--candidate", help="a second checkpoint folder, models:/ URI or version to compare "
                                       "(report.candidate)")
    p.add_argument("--out", help="folder for the report (report.out)")
    args = p.parse_args(argv)
    flags = [f"report.{k}={v}" for k in ("output", "night", "checkpoint", "candidate", "out") if (v := getattr(args, k))]
    from steelray import night_page, night_report, registry, tracking
    from steelray.scoring.plan import ScoreError

    try:
        job = cli.load(args, config.NightReportJob, flags)
        night = night_report.build(job)
    except (config.ConfigError, night_report.ReportError, ScoreError, FileNotFoundError,
            registry.RegistryError) as e:
        print(f"night_report: {e}", file=sys.stderr)
        return cli.BAD_ARGUMENTS
    except tracking.TrackingUnavailable as e:
        print(f"night_report: {e}", file=sys.stderr)
        return cli.BUSY
    written = night_page.write(night, job)
    s = night.summary
    print(f"night {s['night']}, version {s['version']['digest']}: {s['volumes']['scored']} scored, "
          f"{s['volumes']['errors']} error rows, {len(s['alerts'])} alert(s)")
    for alert in s["alerts"]:
        print(f"ALERT {alert}")
    print(f"review: {written['review.csv']}")
    print(f"report: {written['report.html']}")
    return cli.ALERT if s["alerts"] else cli.DONE


if __name__ == "__main__":
    sys.exit(main())
