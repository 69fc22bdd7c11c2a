"""What a small Ray Tune sweep finds on the real NEU images, against the hand-set ``neu.yaml``,
at the same epoch budget, with wall times. Both run in this one process, one after the other.

    python benchmarks/tune_neu.py [--data ../shared/data/neu-det] [--epochs 15] [--samples 8]

The sweep is ``neu.yaml``'s own ``tune:`` section (random search, ASHA) with ``train.epochs`` set to
the budget and one worker per trial (so two trials share a 2-core box); the baseline is ``neu.yaml``
as written (two workers), trained for the same number of epochs.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from steelray import config, train, tune  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "neu-det"
NEU = str(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "neu.yaml")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REAL))
    p.add_argument("--epochs", type=int, default=15, help="epochs per trial (and for the baseline)")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--storage", default=tempfile.mkdtemp(prefix="tune-bench-"))
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--skip-sweep", action="store_true", help="only train the hand-set baseline")
    args = p.parse_args()
    if not Path(args.data).is_dir():
        print(f"no NEU data at {args.data}", file=sys.stderr)
        return 2
    common = [f"data.root={args.data}", f"train.epochs={args.epochs}", f"ray.storage_path={args.storage}"]
    print(f"{time.strftime('%Y-%m-%d %H:%M')} {platform.node()} {os.cpu_count()} CPUs; storage {args.storage}")

    metric = "macro_f1"
    if not args.skip_sweep:
        cfg = config.load(NEU, [*common, "ray.num_workers=1", f"tune.num_samples={args.samples}", "tune.name=bench"])
        started = time.perf_counter()
        sweep = tune.run(cfg)
        sweep_s = time.perf_counter() - started
        t = sweep.trials
        metric = sweep.metric
        print(t.drop(columns=["checkpoint", "error"]).to_string(index=False))
        print(f"sweep: {len(t)} trials ({(t.status == 'stopped early').sum()} stopped early, "
              f"{(t.status == 'failed').sum()} failed), {t.epochs.sum()} trial-epochs, wall {sweep_s / 60:.1f} min; "
              f"best {metric} {sweep.best_value:.4f}; best config {sweep.best_config}")

    if not args.skip_baseline:
        base = config.load(NEU, [*common, "ray.run_name=baseline"])
        started = time.perf_counter()
        result = train.fit(base)
        base_s = time.perf_counter() - started
        m = result.best_metrics
        print(f"hand-set neu.yaml, {args.epochs} epochs: best {metric} {m[metric]:.4f} "
              f"(accuracy {m['accuracy']:.4f}) at epoch {m['epoch']}, wall {base_s / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
