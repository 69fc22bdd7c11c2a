"""Drift: has a distribution moved between a reference and tonight? One statistic for everything the
night report compares (each class's probabilities, each input statistic): the two-sample
Kolmogorov-Smirnov test (scipy), whose statistic is the largest gap between the two cumulative
distributions (0: the same, 1: no overlap), on any scale and without binning.

A distribution is flagged when the statistic passes ``max_ks`` (the size of a shift worth acting on)
and its p-value is below ``max_p`` (a shift that large is not chance on this many sheets): with
thousands of sheets the p-value alone flags shifts too small to matter, with a few dozen the
statistic alone flags noise.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

MIN_SHEETS = 20  # fewer on either side: reported, never flagged


def compare(tonight, reference, max_ks: float, max_p: float) -> dict:
    """KS statistic, p-value, sizes, medians and the flag of ``tonight`` against ``reference``
    (NaN values, e.g. error rows, left out)."""
    a = np.asarray(tonight, np.float64)
    b = np.asarray(reference, np.float64)
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    out = {"n": int(a.size), "reference_n": int(b.size),
           "median": float(np.median(a)) if a.size else None,
           "reference_median": float(np.median(b)) if b.size else None}
    if min(a.size, b.size) < MIN_SHEETS:
        return {**out, "ks": None, "p": None, "flagged": False,
                "note": f"fewer than {MIN_SHEETS} sheets on one side: not tested"}
    test = stats.ks_2samp(a, b)
    ks, p = float(test.statistic), float(test.pvalue)
    return {**out, "ks": ks, "p": p, "flagged": bool(ks >= max_ks and p < max_p)}
