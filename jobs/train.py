"""Train a defect model on Ray Train.

    python jobs/train.py --config jobs/configs/neu.yaml data.root=/data/neu-det train.epochs=30
    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/<x>.yaml [key=value ...]

The config is checked before Ray starts. The last line printed is the best checkpoint's URI.
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
    p.add_argument("--config", required=True, help="YAML config (see jobs/configs/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.lr=3e-4")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = config.load(args.config, args.overrides)
        from steelray import train

        train.target_metric(cfg)
    except (config.ConfigError, FileNotFoundError) as e:
        print(f"train: {e}", file=sys.stderr)
        return 2
    result = train.fit(cfg)
    print(f"run folder: {result.run_uri}")
    print(f"best metrics: " + ", ".join(f"{k} {v:.4g}" for k, v in result.best_metrics.items()
                                        if isinstance(v, float)))
    print(f"best checkpoint: {result.best_checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
