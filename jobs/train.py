"""Train a defect model on Ray Train.

    python jobs/train.py --config jobs/configs/neu.yaml data.root=/data/neu-det train.epochs=30
    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/<x>.yaml [key=value ...]

The config is checked before Ray starts. The last line printed is the best checkpoint's URI.
"""

from __future__ import annotations

import sys

from steelray import cli, config

EXIT_CODES = {cli.DONE: "trained; the last line names the best checkpoint",
              cli.FAILED: "training failed (a worker error past ray.max_failures, divergence)",
              cli.BAD_ARGUMENTS: "bad config: do not retry before fixing it"}


def main(argv=None) -> int:
    args = cli.parser(__doc__, EXIT_CODES, config_required=True).parse_args(argv)
    try:
        cfg = cli.load(args, config.Config)
        from steelray import train

        train.target_metric(cfg)
    except (config.ConfigError, FileNotFoundError) as e:
        print(f"train: {e}", file=sys.stderr)
        return cli.BAD_ARGUMENTS
    result = train.fit(cfg)
    print(f"run folder: {result.run_uri}")
    if result.tracking:
        print(result.tracking)
    kept = "best" if cfg.train.keep == "best" else "last epoch's"
    print(f"{kept} metrics: " + ", ".join(f"{k} {v:.4g}" for k, v in result.best_metrics.items()
                                         if isinstance(v, float)))
    print(f"{kept} checkpoint: {result.best_checkpoint}")
    return cli.DONE


if __name__ == "__main__":
    sys.exit(main())
