"""What the "crushed" condition (``steelray/conditions.py``) leaves of a labelled image set: per class,
how many images it turns entirely black or leaves with under 1% of their pixels lit, and the best
macro-F1 any model could reach on the crushed images (every image with a lit pixel right, the black
ones all given one class: the commonest among them). The difference from 1 is the least drop a
model must show under crushed, whatever it learns.

    .ci/in-venv python benchmarks/crushed_floor.py --data ../shared/data/neu-det
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from steelray import conditions, config, data, images  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a NEU folder (or any folder jobs/train.py reads with --format)")
    p.add_argument("--format", default="neu")
    args = p.parse_args()
    cfg = config.load(None, [f"data.format={args.format}", f"data.root={args.data}", "data.in_chans=1"])
    manifest = data.build_manifest(cfg)
    rows = manifest.records
    total, black, dim = Counter(), Counter(), Counter()
    truth = []
    for uri, labels in zip(rows.uri, rows.labels):
        c = manifest.classes[labels[0]]
        lit = (conditions.perturb_image(images.load_image(uri, 1), "crushed") > 0).mean()
        total[c] += 1
        truth.append(c)
        if lit == 0:
            black[c] += 1
        if lit < 0.01:
            dim[c] += 1
    from sklearn.metrics import f1_score

    guess = black.most_common(1)[0][0] if black else None
    left = Counter(black)  # that many images of each class are black: all of them called `guess`
    pred = []
    for c in truth:
        pred.append(guess if left[c] > 0 else c)
        left[c] -= 1
    best = f1_score(truth, pred, average="macro")
    out = {"images": len(truth), "per_class": {c: {"images": total[c], "all_black": black[c], "under_1pct_lit": dim[c]}
                                               for c in manifest.classes},
           "all_black": sum(black.values()), "under_1pct_lit": sum(dim.values()), "black_called": guess,
           "best_macro_f1": best, "least_drop": 1 - best}
    print("class | images | entirely black | under 1% lit")
    for c in manifest.classes:
        print(f"{c} | {total[c]} | {black[c]} | {dim[c]}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
