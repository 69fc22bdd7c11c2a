"""Export a checkpoint for CPU scoring and the line: an ONNX model checked against PyTorch, and an
INT8 model that must keep its accuracy.

    python jobs/export.py --checkpoint runs/neu/epoch-0069
    python jobs/export.py --checkpoint s3://models/sev/epoch-0020 --out s3://models/sev/epoch-0020-onnx
    ray job submit --working-dir . -- python jobs/export.py --checkpoint s3://... --data s3://.../neu-det

Writes model.onnx, model.int8.onnx and export.json (the figures) into --out (default: <checkpoint>/export).
The ONNX model takes uint8 sheets at the checkpoint's input size, normalises them in its graph and
gives probabilities; it carries the checkpoint's classes and thresholds. Parity: its probabilities
against PyTorch's on validation images of the checkpoint's data (--data: its root, when not where
training read it), refused past export.tolerance. INT8: calibrated on training-split images, then
evaluated as jobs/evaluate.py evaluates (the validation split), refused when its macro-F1 (Dice for
segmenters) falls more than export.max_drop below the checkpoint's. Settings: `export.*`, `data.*`, `s3.*`.
Score with an exported model: `jobs/score.py score.engine=onnxruntime score.checkpoint=.../model.int8.onnx`;
one image at the line: `python -m steelray.line model.int8.onnx sheet.jpg`.
"""

from __future__ import annotations

import sys

from steelray import cli, config

EXIT_CODES = {cli.DONE: "exported (and INT8 passed its gate, where asked)",
              cli.FAILED: "refused: parity past export.tolerance (nothing written), or INT8 past export.max_drop "
                          "(model.onnx written, model.int8.onnx not)",
              cli.BAD_ARGUMENTS: "bad arguments, checkpoint or data",
              cli.BUSY: "a models:/ checkpoint and the MLflow server cannot be reached: retry later"}


def main(argv=None) -> int:
    p = cli.parser(__doc__, EXIT_CODES, config_help="YAML with export:, data: and s3: sections (optional)")
    p.add_argument("--checkpoint", help="checkpoint folder or s3:// prefix, or models:/<name>@<alias> "
                                        "(export.checkpoint)")
    p.add_argument("--data", help="the checkpoint's data root, where not where training read it (data.root)")
    p.add_argument("--out", help="output folder (export.out; default <checkpoint>/export)")
    p.add_argument("--no-int8", action="store_true", help="the fp32 ONNX model only")
    args = p.parse_args(argv)
    flags = [f"export.{k}={v}" for k in ("checkpoint", "out") if (v := getattr(args, k))]
    flags += [f"data.root={args.data}"] * bool(args.data) + ["export.int8=false"] * args.no_int8
    from steelray import evaluate, export, images, onnx_model, registry, storage, tracking

    try:
        job = cli.load(args, config.ExportJob, flags)
        result = export.run(job)
    except export.ExportError as e:
        print(f"export: {e}", file=sys.stderr)
        return cli.FAILED
    except (config.ConfigError, evaluate.EvaluationError, images.DataError, onnx_model.ExportedModelError,
            FileNotFoundError, registry.RegistryError) as e:
        print(f"export: {e}", file=sys.stderr)
        return cli.BAD_ARGUMENTS
    except tracking.TrackingUnavailable as e:
        print(f"export: {e}", file=sys.stderr)
        return cli.BUSY
    par = result.fp32["parity"]
    print(f"model.onnx: {result.fp32['uri']} (version {result.fp32['digest']}); parity on {par['images']} "
          f"validation images: largest probability difference {par['max_abs_diff']:.2e} "
          f"(tolerance {par['tolerance']:.0e})")
    if job.export.int8:
        g = result.int8
        line = (f"INT8 gate: {g['metric']} {g['int8']:.4f} against PyTorch's {g['pytorch']:.4f} on {g['images']} "
                f"validation images, drop {g['drop']:.4f} (at most {g['max_drop']:.4f})")
        if result.refused:
            print(f"export: INT8 refused. {line}", file=sys.stderr)
        else:
            print(f"model.int8.onnx: {g['uri']} (version {g['digest']}); {line}")
    print(f"figures: {storage.join(result.out, export.REPORT)}")
    return cli.FAILED if result.refused else cli.DONE


if __name__ == "__main__":
    sys.exit(main())
