"""Would routing clipped sheets to an under-exposure specialist meet the crushed target? A screen on one
fold, generalist and specialist of any input size (a routed ensemble, ``jobs/ensemble.py --route``,
needs one input for both): each validation image, clean and under each of evaluation's conditions
(``steelray/conditions.py``, applied at full resolution as evaluation applies them), goes to the
specialist when more than ``--gate`` of its pixels at the specialist's input are black (0, clipped)
and to the generalist otherwise (by default the gate is ``predict.route_gate`` of the specialist: the
largest black share of any of the fold's training images, clean or under a condition other than
crushed: chosen without the validation images). Printed per condition: how many were routed, and accuracy, macro-F1 (argmax) and wrong
images of the generalist alone, the specialist alone and the routed pair, with each one's drop from
its own clean macro-F1.

    .ci/in-venv python benchmarks/crushed_routing.py --data ../shared/data/neu-det --fold 0 \\
        --generalist RUN/epoch-0070 --specialist SPECIALIST [--gate 0.1]

The specialist: ``benchmarks/crushed_ceiling.py --crush underexposure --save SPECIALIST``. Both
checkpoints must come from the same fold (their validation images are this fold's). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from crushed_ceiling import figures as scores  # noqa: E402  (this folder is on sys.path: run as a script)
from steelray import checkpoint, conditions, config, data, images, model_io, predict  # noqa: E402


class Views(Dataset):
    """Each image (perturbed as evaluation perturbs it) at both models' input sizes, with the black share
    of the last one's (the specialist's)."""

    def __init__(self, uris: list[str], pres: list[model_io.Preprocess], perturb: str | None):
        self.uris, self.pres, self.perturb = uris, pres, perturb

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, i: int):
        image = images.load_image(self.uris[i], self.pres[0].in_chans)
        if self.perturb is not None:
            image = conditions.perturb_image(image, self.perturb, seed=i)
        views = [model_io.resize(image, p.size) for p in self.pres]
        return [model_io.to_chw(v) for v in views], float((views[-1] == 0).mean())


@torch.no_grad()
def predictions(models: list, pres: list, uris: list[str], perturb: str | None) -> tuple[list[np.ndarray], np.ndarray]:
    preds, black = [[] for _ in models], []
    for xs, share in DataLoader(Views(uris, pres, perturb), batch_size=64):
        for k, (model, pre, x) in enumerate(zip(models, pres, xs)):
            preds[k].append(model(model_io.model_input(x, pre)).argmax(1).numpy())
        black.append(share.numpy())
    return [np.concatenate(p) for p in preds], np.concatenate(black)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a NEU folder")
    p.add_argument("--config", default="jobs/configs/neu.yaml", help="the split: data.* of this config")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--generalist", required=True, help="checkpoint folder")
    p.add_argument("--specialist", required=True, help="checkpoint folder")
    p.add_argument("--gate", type=float, default=None,
                   help="share of black pixels above which an image goes to the specialist (default: from the training images)")
    args = p.parse_args()
    cfg = config.load(args.config, [f"data.root={args.data}", f"data.folds={args.folds}", f"data.fold={args.fold}"])
    _, val_m = data.split(data.build_manifest(cfg), cfg.data)
    loaded = [checkpoint.load_model(c) for c in (args.generalist, args.specialist)]
    for _, meta in loaded:
        if meta["classes"] != list(val_m.classes):
            sys.exit(f"crushed_routing: a checkpoint's classes {meta['classes']} are not the fold's {list(val_m.classes)}")
    models = [m for m, _ in loaded]
    pres = [model_io.Preprocess.from_dict(meta["preprocess"]) for _, meta in loaded]
    uris, truth = list(val_m.records.uri), val_m.targets("multiclass")
    gate = args.gate
    if gate is None:
        gate = predict.route_gate(args.specialist)
    rows = {}
    for name in ("clean", *conditions.CONDITIONS):
        (general, special), black = predictions(models, pres, uris, None if name == "clean" else name)
        routed = black > gate
        both = np.where(routed, special, general)
        rows[name] = {"routed": int(routed.sum()), "black_share_median": float(np.median(black)),
                      "black_share_min": float(black.min()), "black_share_max": float(black.max()),
                      "generalist": scores(general, truth), "specialist": scores(special, truth),
                      "routed_pair": scores(both, truth)}
    for name in rows:
        for who in ("generalist", "specialist", "routed_pair"):
            rows[name][who]["drop"] = rows["clean"][who]["macro_f1"] - rows[name][who]["macro_f1"]
    print(json.dumps({"fold": args.fold, "folds": args.folds, "val_images": len(val_m), "gate": gate,
                      "generalist": args.generalist, "specialist": args.specialist, "conditions": rows}))


if __name__ == "__main__":
    main()
