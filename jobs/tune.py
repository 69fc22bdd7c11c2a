"""Sweep a training config's hyperparameters on Ray Tune (ASHA early stopping; random, grid or Optuna TPE).

    python jobs/tune.py --config jobs/configs/neu.yaml data.root=/data/neu-det tune.num_samples=8
    ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/<x>.yaml [key=value ...]

The search space is the config's ``tune.space`` (see jobs/configs/neu.yaml); empty, it is the old
Optuna study's (lr, batch size, frozen stages, scheduler). Rerun with the same ``tune.name`` to resume
an interrupted sweep. Writes trials.csv / trials.parquet and best.yaml (ready for jobs/train.py) in the
sweep folder; the last line printed is the best checkpoint's URI.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from steelray import config  # noqa: E402

# Tune saves the sweep's state at most this often (seconds): what a killed sweep can lose.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "10")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML training config with an optional tune: section")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. tune.num_samples=8")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = config.load(args.config, args.overrides)
        from steelray import train, tune

        train.target_metric(cfg)
        cfg = tune.with_space(cfg)
    except (config.ConfigError, FileNotFoundError) as e:
        print(f"tune: {e}", file=sys.stderr)
        return 2
    try:
        result = tune.run(cfg)
    except tune.SweepError as e:
        print(f"tune: {e}", file=sys.stderr)
        return 1
    columns = [c for c in result.trials.columns if c not in ("checkpoint", "error")]
    print(result.trials[columns].to_string(index=False))
    for row in result.trials[result.trials.status == "failed"].itertuples():
        print(f"trial {row.trial_id} failed: {row.error}")
    print(f"sweep folder: {result.sweep_uri}{' (resumed)' if result.resumed else ''}")
    print(f"trials table: {result.sweep_uri}/trials.csv")
    print(f"best {result.metric}: {result.best_value:.4g}")
    print(f"best config: {result.best_config}")
    print(f"best checkpoint: {result.best_checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
