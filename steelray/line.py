"""The line-side scorer: sheets one at a time from an exported model alone (``jobs/export.py``), on
the PC beside the camera. Imports neither torch nor Ray (ONNX Runtime, NumPy, Pillow, OpenCV and
pyarrow do the work). Its row is the scoring job's row, column for column and decision for
decision: it runs the nightly job's own decode stage and model actor on a batch of one.

    scorer = LineScorer("model.int8.onnx")
    row = scorer.score("/camera/sheet_0001.jpg")   # image_id, ..., prob_<class>, labels, any_defect, error

    python -m steelray.line model.int8.onnx /camera/sheet_0001.jpg ...   # a JSON row per image
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from steelray.config import ScoreConfig
from steelray.scoring.actor import ActorSettings, Scorer
from steelray.scoring.decode import read_and_decode
from steelray.scoring.plan import ScoreError, make_plan


class LineScorer:
    """An exported model (and, for a cascade, an exported segmenter) ready to score single sheets.
    ``expect_size`` and ``min_area`` are the scoring job's ``score.expect_size`` and ``score.min_area``."""

    def __init__(self, model: str, segmenter: str = "", threads: int = 0, expect_size: tuple[int, int] | None = None,
                 min_area: tuple[int, ...] = ()):
        sc = ScoreConfig(checkpoint=model, segmenter=segmenter, engine="onnxruntime",
                         expect_size=list(expect_size or ()), min_area=list(min_area))
        self.plan = make_plan(sc, None)
        self.scorer = Scorer(self.plan, ActorSettings(threads=threads))
        self.inputs = [p.to_dict() for p in self.plan.inputs]

    def score(self, path: str, image_id: str = "") -> dict:
        """The output row of the image at ``path`` (its ``error`` says why where it could not be scored)."""
        batch = {"image_id": np.array([image_id or os.path.basename(path)], dtype=object),
                 "source_uri": np.array([path], dtype=object)}
        decoded = read_and_decode(batch, inputs=self.inputs, expect_size=self.plan.expect_size, s3=None,
                                  retries=0, threads=1)
        return self.scorer(decoded).to_pylist()[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Score sheets one at a time with an exported model: a JSON row "
                                            "per image on stdout (the scoring job's columns).")
    p.add_argument("model", help="exported model (.onnx from jobs/export.py)")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--segmenter", default="", help="exported segmenter: a cascade, as score.segmenter")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: every core)")
    args = p.parse_args(argv)
    try:
        scorer = LineScorer(args.model, args.segmenter, args.threads)
    except (ScoreError, FileNotFoundError) as e:
        print(f"line: {e}", file=sys.stderr)
        return 2
    failed = 0
    for path in args.images:
        row = scorer.score(path)
        failed += row["error"] is not None
        print(json.dumps(row, default=str), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
