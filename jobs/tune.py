"""Sweep a training config's hyperparameters on Ray Tune (ASHA early stopping; random, grid or Optuna TPE).

    python jobs/tune.py --config jobs/configs/neu.yaml data.root=/data/neu-det tune.num_samples=8
    ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/<x>.yaml [key=value ...]

The search space is the config's ``tune.space`` (see jobs/configs/neu.yaml); empty, it is the old
Optuna study's (lr, batch size, frozen stages, scheduler). Rerun with the same ``tune.name`` to resume
an interrupted sweep. Writes trials.csv / trials.parquet and best.yaml (ready for jobs/train.py) in the
sweep folder; the last line printed is the best checkpoint's URI.
"""

from __future__ import annotations

import os
import sys

from steelray import cli, config

EXIT_CODES = {cli.DONE: "swept; the last line names the best checkpoint",
              cli.FAILED: "the sweep failed (no trial finished)",
              cli.BAD_ARGUMENTS: "bad config or search space: do not retry before fixing it"}

# Tune saves the sweep's state at most this often (seconds): what a killed sweep can lose.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "10")


def main(argv=None) -> int:
    args = cli.parser(__doc__, EXIT_CODES, config_required=True,
                      config_help="YAML training config with an optional tune: section").parse_args(argv)
    try:
        cfg = cli.load(args, config.Config)
        from steelray import train, tune

        train.target_metric(cfg)
        cfg = tune.with_space(cfg)
    except (config.ConfigError, FileNotFoundError) as e:
        print(f"tune: {e}", file=sys.stderr)
        return cli.BAD_ARGUMENTS
    try:
        result = tune.run(cfg)
    except tune.SweepError as e:
        print(f"tune: {e}", file=sys.stderr)
        return cli.FAILED
    columns = [c for c in result.trials.columns if c not in ("checkpoint", "error")]
    print(result.trials[columns].to_string(index=False))
    for row in result.trials[result.trials.status == "failed"].itertuples():
        print(f"trial {row.trial_id} failed: {row.error}")
    print(f"sweep folder: {result.sweep_uri}{' (resumed)' if result.resumed else ''}")
    print(f"trials table: {result.sweep_uri}/trials.csv")
    if result.tracking:
        print(result.tracking)
    print(f"best {result.metric}: {result.best_value:.4g}")
    print(f"best config: {result.best_config}")
    print(f"best checkpoint: {result.best_checkpoint}")
    return cli.DONE


if __name__ == "__main__":
    sys.exit(main())
