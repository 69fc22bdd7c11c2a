"""The main job on the embedded default: no data or cluster needed.

Generates a small synthetic Severstal-format set, reads it back through the data layer (manifest,
validation, split, decoding), trains a small multi-label classifier briefly on a local Ray (2 gloo
workers), scores a night's worth of sheets with it (plus one corrupt file, which becomes an error row)
into Parquet, writes the morning report on that night, and prints where every output went.

    python jobs/demo.py [--out DIR] [--n 32] [--epochs 2] [--config YAML] [key=value ...]

The training config is jobs/configs/severstal_multilabel.yaml shrunk to a tiny model and small
inputs (so the demo runs in a minute on a laptop); --config and key=value settings go over that.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

from steelray import cli, config, data, images, synth

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "severstal_multilabel.yaml")
EXIT_CODES = {cli.DONE: "done; every output is listed", cli.BAD_ARGUMENTS: "bad arguments"}


def main(argv=None) -> int:
    p = cli.parser(__doc__, EXIT_CODES, config_help=f"training config (default: {os.path.relpath(CONFIG)})")
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "steelray-demo"),
                   help="folder for everything the demo writes (default: %(default)s)")
    p.add_argument("--n", type=int, default=32, help="synthetic sheets to generate (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=2, help="training epochs (default 2; 0 skips training)")
    args = p.parse_args(argv)
    args.config = args.config or CONFIG
    start = time.perf_counter()
    out = os.path.abspath(args.out)

    written = synth.make_severstal(os.path.join(out, "data"), args.n, args.seed)
    print(f"[1/6] generated {written.count} synthetic sheets ({written.defect_free} defect-free) "
          f"-> {written.images}")

    # The example config, shrunk to a tiny model and small inputs so the demo runs in a minute on a laptop.
    try:
        cfg = cli.load(args, config.Config, [
            f"data.root={written.root}", f"data.seed={args.seed}", "model.name=simple_cnn", "input.size=[64,400]",
            "input.crop=[]", "train.batch_size=8", "train.lr=2e-3", f"train.epochs={max(args.epochs, 1)}",
            "train.warmup_epochs=0", "train.loader_workers=0", "ray.use_gpu=false",
            f"ray.storage_path={os.path.join(out, 'runs')}", "ray.run_name=demo"])
    except config.ConfigError as e:
        print(f"demo: {e}", file=sys.stderr)
        return cli.BAD_ARGUMENTS
    config.save(cfg, os.path.join(out, "config.yaml"))
    manifest = data.build_manifest(cfg)
    train, val = data.split(manifest, cfg.data)
    manifest_uri = os.path.join(out, "manifest.parquet")
    manifest.records.to_parquet(manifest_uri, index=False)
    print(f"[2/6] manifest: {manifest.summary()}")
    print(f"      split (seed {cfg.data.seed}): {len(train)} train / {len(val)} validation")

    first = images.load_image(val.records["uri"].iloc[0], cfg.data.in_chans, cfg.s3)
    print(f"[3/6] decoded {val.records['image_id'].iloc[0]} as {first.shape[0]}x{first.shape[1]}x{first.shape[2]} "
          f"(in_chans={cfg.data.in_chans})")

    best = None
    if args.epochs > 0:
        from steelray import train

        shutil.rmtree(os.path.join(out, "runs", "demo"), ignore_errors=True)  # same run name would resume
        result = train.fit(cfg)
        best = result.best_checkpoint
        print(f"[4/6] trained {cfg.model.name} for {result.epochs} epoch(s) on 2 workers: "
              + ", ".join(f"{k} {result.best_metrics[k]:.3f}" for k in ("val_loss", "macro_f1", "roc_auc")))

    predictions = None
    if best:
        from steelray.scoring import job

        incoming = os.path.join(out, "incoming")
        shutil.rmtree(incoming, ignore_errors=True)
        os.makedirs(incoming)
        for name in sorted(os.listdir(written.images))[:16]:
            shutil.copy(os.path.join(written.images, name), incoming)
        with open(os.path.join(incoming, "corrupt.jpg"), "wb") as f:
            f.write(b"\xff\xd8\xff\xe0 not really a jpeg")
        predictions = os.path.join(out, "predictions")
        shutil.rmtree(predictions, ignore_errors=True)
        summary = job.run(config.load(None, [f"score.input={incoming}", f"score.checkpoint={best}",
                                               f"score.output={predictions}"], config.ScoreJob))
        print("[5/6] scored: " + "\n      ".join(summary.lines()))
        from steelray import night_page, night_report

        rjob = config.load(None, [f"report.output={predictions}"], config.NightReportJob)
        night = night_report.build(rjob)
        report = night_page.write(night, rjob)["report.html"]
        print(f"[6/6] morning report: {len(night.summary['alerts'])} alert(s)"
              + "".join(f"\n      ALERT {a}" for a in night.summary["alerts"]))

    print("\noutputs:")
    print(f"  images     {written.images}")
    print(f"  labels     {written.labels_csv}")
    print(f"  manifest   {manifest_uri}")
    print(f"  config     {os.path.join(out, 'config.yaml')}")
    if best:
        print(f"  metrics    {os.path.join(out, 'runs', 'demo', 'metrics.csv')}")
        print(f"  checkpoint {best}")
    if predictions:
        print(f"  scores     {predictions} (Parquet, partitioned by run_date)")
        print(f"  report     {report}")
    print(f"done in {time.perf_counter() - start:.1f}s.")
    return cli.DONE


if __name__ == "__main__":
    sys.exit(main())
