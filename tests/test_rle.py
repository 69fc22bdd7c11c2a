import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from steelray import rle


def test_kaggle_numbering_is_column_major_and_one_indexed():
    mask = np.zeros((4, 3), dtype=bool)
    mask[0:2, 0] = True   # pixels 1, 2
    mask[3, 0] = True     # pixel 4
    mask[0, 1] = True     # pixel 5: touches pixel 4 in Kaggle's order, so one run
    assert rle.encode(mask) == "1 2 4 2"
    np.testing.assert_array_equal(rle.decode("1 2 4 2", (4, 3)), mask)


def test_empty_string_is_empty_mask():
    assert rle.encode(np.zeros((256, 1600), bool)) == ""
    assert not rle.decode("").any()
    assert rle.decode("").shape == (256, 1600)


def test_full_mask():
    assert rle.encode(np.ones((256, 1600), bool)) == "1 409600"


@settings(max_examples=200, deadline=None)
@given(arrays(bool, st.tuples(st.integers(1, 40), st.integers(1, 40))))
def test_round_trip_mask(mask):
    assert np.array_equal(rle.decode(rle.encode(mask), mask.shape), mask)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(1, 30)), max_size=30))
def test_round_trip_string(gaps_and_lengths):
    # canonical strings: sorted, separated by at least one pixel
    runs, pos = [], 1
    for gap, length in gaps_and_lengths:
        start = pos + gap + (1 if runs else 0)
        runs.append((start, length))
        pos = start + length
    text = " ".join(f"{s} {n}" for s, n in runs)
    shape = (37, max(1, -(-pos // 37)))
    assert rle.encode(rle.decode(text, shape)) == text
    assert rle.area(text, shape) == sum(n for _, n in runs)


@pytest.mark.parametrize("text, says", [
    ("1 2 3", "odd number of tokens"),
    ("1 x", "non-integer token 'x'"),
    ("1 2.5", "non-integer token '2.5'"),
    ("1 0", "zero or negative length"),
    ("5 -2", "zero or negative length"),
    ("0 3", "start before pixel 1"),
    ("11 3", "past the last pixel"),
    ("5 2 1 2", "not sorted"),
    ("1 5 3 2", "overlap"),
])
def test_invalid_strings_say_what_is_wrong(text, says):
    with pytest.raises(ValueError, match=says):
        rle.decode(text, (4, 3))


def test_touching_runs_decode_and_merge_on_encode():
    assert rle.encode(rle.decode("1 2 3 2", (4, 3))) == "1 4"


def test_encode_rejects_non_binary_and_non_2d():
    with pytest.raises(ValueError, match="0 and 1"):
        rle.encode(np.array([[0, 2]]))
    with pytest.raises(ValueError, match="2-D"):
        rle.encode(np.zeros((2, 2, 2), bool))


def test_real_severstal_rows_round_trip(severstal_real):
    rows = pd.read_csv(severstal_real / "train.csv")
    assert len(rows) > 0
    for row in rows.itertuples():
        mask = rle.decode(row.EncodedPixels)
        assert mask.sum() == sum(int(n) for n in row.EncodedPixels.split()[1::2])
        assert rle.encode(mask) == row.EncodedPixels, f"{row.ImageId} class {row.ClassId}"
