"""What test-time augmentation costs in scoring, side by side in one run: sheets/s of the scoring
actor's model call (``TorchModel``, uint8 sheets to probabilities, as the nightly job runs it on CPU)
with ``score.tta`` none, flips and (square inputs) dihedral, engines alternating in rounds; and, for the
NEU model, its macro-F1 on the validation split with each (``evaluate.run``, the same images).

    .ci/in-venv python benchmarks/tta_cost.py --neu-checkpoint /tmp/neuexp/neu-export/epoch-0070 \
        --neu ../shared/data/neu-det --severstal ../shared/data/severstal-sample
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch


def actors(ckpt: str, modes: list[str], threads: int, batch: int) -> dict:
    from steelray import config
    from steelray.scoring.actor import ActorSettings, TorchModel
    from steelray.scoring.plan import make_plan

    out = {}
    for mode in modes:
        info = make_plan(config.load(None, [f"score.checkpoint={ckpt}", f"score.tta={mode}"], config.ScoreJob).score,
                         None).primary
        out[mode] = TorchModel(info, ActorSettings(threads=threads, batch=batch), None)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--neu-checkpoint", required=True)
    p.add_argument("--neu", required=True)
    p.add_argument("--severstal", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=6.0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from export_speed import repeated, sheet_model, speed, validation_batch, write_results

    from steelray import config, evaluate

    results = {}
    batch = validation_batch(args.neu_checkpoint, args.neu, args.batch)
    modes = ["none", "flips", "dihedral"]
    results["neu_speed"] = speed(actors(args.neu_checkpoint, modes, args.threads, args.batch), batch, args.rounds,
                                 args.seconds)
    print("NEU", json.dumps(results["neu_speed"]), flush=True)
    results["neu_macro_f1"] = {}
    for mode in modes:
        ev = evaluate.run(config.load(None, [f"evaluate.checkpoint={args.neu_checkpoint}", f"data.root={args.neu}",
                                             "evaluate.robustness=false", f"evaluate.tta={mode}"], config.EvaluateJob))
        results["neu_macro_f1"][mode] = {"macro_f1": ev.before["macro_f1"], "accuracy": ev.before["accuracy"],
                                         "images": len(ev.manifest)}
    print("NEU macro-F1", json.dumps(results["neu_macro_f1"]), flush=True)

    tmp = tempfile.mkdtemp(prefix="tta-cost-")
    r18, sheets = sheet_model(f"{tmp}/r18", args.severstal)
    results["r18_speed"] = speed(actors(r18, ["none", "flips"], args.threads, args.batch),
                                 repeated(sheets, args.batch), args.rounds, args.seconds)
    print("resnet18 256x1600", json.dumps(results["r18_speed"]), flush=True)
    write_results(results, tmp)


if __name__ == "__main__":
    main()
