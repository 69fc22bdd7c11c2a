import subprocess
import sys
from collections import Counter

import numpy as np
import pandas as pd
import s3fs
from PIL import Image

from steelray import data, rle, synth
from steelray.config import DataConfig


def test_same_seed_same_sheet_other_seed_other_sheet():
    a_img, a_masks = synth.severstal_sheet(3, 5)
    b_img, b_masks = synth.severstal_sheet(3, 5)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_masks, b_masks)
    assert not np.array_equal(a_img, synth.severstal_sheet(4, 5)[0])
    assert np.array_equal(synth.neu_image(1, 2, "patches"), synth.neu_image(1, 2, "patches"))


def test_every_chosen_class_gets_a_mask_and_no_other():
    for c in range(4):
        freq = tuple(float(i == c) for i in range(4))
        for i in range(6):
            image, masks = synth.severstal_sheet(11, i, 0.0, freq, 0.0)
            assert image.shape == (256, 1600) and image.dtype == np.uint8
            assert [m.any() for m in masks] == [k == c for k in range(4)], (c, i)
    _, masks = synth.severstal_sheet(11, 0, 1.0)
    assert not masks.any()


def test_class_frequencies_follow_the_configured_skew():
    draws = [synth.sheet_classes(0, i, multi_share=0.0) for i in range(4000)]
    free = sum(not d for d in draws) / len(draws)
    counts = Counter(c for d in draws for c in d)
    total = sum(counts.values())
    assert abs(free - synth.DEFECT_FREE_SHARE) < 0.03
    for c, expected in enumerate(np.array(synth.CLASS_FREQ) / sum(synth.CLASS_FREQ)):
        assert abs(counts[c] / total - expected) < 0.03
    assert counts[2] == max(counts.values())  # class 3 dominates, as in Severstal
    defective = [d for d in (synth.sheet_classes(1, i) for i in range(4000)) if d]
    assert abs(sum(len(d) == 2 for d in defective) / len(defective) - synth.MULTI_SHARE) < 0.02


def test_sheets_look_like_rolled_steel(severstal_real):
    """Brightness and contrast within the real sample's range; texture runs along the strip."""
    def stats(image):
        f = image.astype(float)
        hp = f - (np.roll(f, 8, 1) + np.roll(f, -8, 1) + np.roll(f, 8, 0) + np.roll(f, -8, 0)) / 4
        along = np.corrcoef(hp[:, :-3].ravel(), hp[:, 3:].ravel())[0, 1]
        across = np.corrcoef(hp[:-3].ravel(), hp[3:].ravel())[0, 1]
        return f.mean(), f.std(), along - across
    real = [stats(np.asarray(Image.open(p).convert("L"))) for p in sorted((severstal_real / "train_images").iterdir())]
    fake = [stats(synth.severstal_sheet(0, i)[0]) for i in range(8)]
    lo_mean, hi_mean = min(r[0] for r in real), max(r[0] for r in real)
    assert all(lo_mean - 15 <= f[0] <= hi_mean for f in fake)
    assert all(5 < f[1] < 90 for f in fake)
    assert np.median([f[2] for f in fake]) > 0  # rolling texture: more correlated along rows


def test_written_set_reads_back_exactly(tmp_path):
    w = synth.make_severstal(str(tmp_path), 12, seed=2, defect_free_share=0.3, workers=1)
    rows = pd.read_csv(w.labels_csv, keep_default_na=False)
    assert list(rows.columns) == ["ImageId", "ClassId", "EncodedPixels"]
    assert rows.sort_values(["ImageId", "ClassId"]).index.tolist() == rows.index.tolist()
    for row in rows.itertuples():
        image, masks = synth.severstal_sheet(2, [synth.severstal_image_id(2, i) for i in range(12)].index(row.ImageId), 0.3)
        assert rle.encode(masks[row.ClassId - 1]) == row.EncodedPixels
    files = sorted((tmp_path / "train_images").iterdir())
    assert len(files) == 12
    im = Image.open(files[0])
    assert im.size == (1600, 256) and im.mode == "RGB"  # grayscale stored as RGB, like the real JPEGs


def test_parallel_and_serial_writes_match(tmp_path):
    a = synth.make_severstal(str(tmp_path / "a"), 16, seed=4, workers=1)
    b = synth.make_severstal(str(tmp_path / "b"), 16, seed=4, workers=2)
    assert open(a.labels_csv).read() == open(b.labels_csv).read()


def test_generates_to_s3(bucket):
    w = synth.make_severstal(f"{bucket}/sev", 5, seed=1, defect_free_share=0.0, workers=1)
    fs = s3fs.S3FileSystem()
    assert len(fs.ls(f"{bucket}/sev/train_images")) == 5
    m = data.build_manifest(DataConfig(format="severstal", root=f"{bucket}/sev"))
    assert len(m) == 5 and all(m.records["labels"].map(len) > 0)
    assert w.labels_csv == f"{bucket}/sev/train.csv"


def test_neu_set(tmp_path):
    w = synth.make_neu(str(tmp_path), 2, workers=1)
    labels = pd.read_csv(w.labels_csv)
    assert len(labels) == 12 and set(labels["label"]) == set(data.NEU_CLASSES)
    assert Image.open(tmp_path / "images" / "crazing_1.jpg").size == (200, 200)


def test_make_data_cli(tmp_path):
    help_text = subprocess.run([sys.executable, "jobs/make_data.py", "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "--defect-free-share" in help_text.stdout and "s3://" in help_text.stdout
    run = subprocess.run([sys.executable, "jobs/make_data.py", "--out", str(tmp_path / "d"), "--n", "3",
                          "--montage", str(tmp_path / "m.png")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "wrote 3 severstal images" in run.stdout and (tmp_path / "m.png").exists()
    bad = subprocess.run([sys.executable, "jobs/make_data.py", "--out", str(tmp_path / "e"), "--class-freq", "1,x"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--class-freq" in bad.stderr
