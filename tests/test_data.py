import io
import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import s3fs
from PIL import Image

from steelray import data, images, rle, storage, synth
from steelray.config import DataConfig
from steelray.images import DataError


def severstal_cfg(root, **kw) -> DataConfig:
    return DataConfig(format="severstal", root=str(root), **kw)


def copy_sheets(sheets, tmp_path) -> Path:
    dst = tmp_path / "sev"
    shutil.copytree(sheets.root, dst)
    return dst


# --- Severstal ------------------------------------------------------------------------------------

def test_severstal_manifest_matches_what_was_written(sheets):
    m = data.build_manifest(severstal_cfg(sheets.root))
    rows = pd.read_csv(sheets.labels_csv, keep_default_na=False)
    assert len(m) == 24 and m.has_masks and m.classes == ["1", "2", "3", "4"]
    assert sum(len(x) == 0 for x in m.records["labels"]) == sheets.defect_free > 0
    assert m.class_counts() == sheets.per_class
    for row in rows.itertuples():
        rec = m.records.set_index("image_id").loc[row.ImageId]
        assert rec.rles[int(row.ClassId) - 1] == row.EncodedPixels
        assert int(row.ClassId) - 1 in rec.labels
    # every sheet without a row is defect-free with empty masks
    free = m.records[[len(x) == 0 for x in m.records["labels"]]]
    assert set(free["image_id"]).isdisjoint(rows["ImageId"])
    assert all(r == ["", "", "", ""] for r in free["rles"])


def test_severstal_old_csv_form_gives_the_same_manifest(sheets, tmp_path):
    root = copy_sheets(sheets, tmp_path)
    rows = pd.read_csv(root / "train.csv", keep_default_na=False)
    pixels = {(r.ImageId, str(r.ClassId)): r.EncodedPixels for r in rows.itertuples()}
    images = sorted(p.name for p in (root / "train_images").iterdir())
    lines = ["ImageId_ClassId,EncodedPixels"] + [
        f"{i}_{c},{pixels.get((i, c), '')}" for i in images for c in "1234"]
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    old = data.build_manifest(severstal_cfg(root))
    new = data.build_manifest(severstal_cfg(sheets.root))
    pd.testing.assert_frame_equal(old.records.drop(columns="uri"), new.records.drop(columns="uri"))


def test_real_severstal_sample(severstal_real):
    m = data.build_manifest(severstal_cfg(severstal_real))
    rows = pd.read_csv(severstal_real / "train.csv")
    assert len(m) == 10 and set(m.records["image_id"]) == set(rows["ImageId"])
    assert all(len(x) > 0 for x in m.records["labels"])  # every sample sheet has a defect
    for row in rows.itertuples():
        rec = m.records.set_index("image_id").loc[row.ImageId]
        mask = rle.decode(rec.rles[row.ClassId - 1])
        assert mask.sum() == sum(int(n) for n in row.EncodedPixels.split()[1::2])
    assert m.class_counts()["1"] == 0 and m.class_counts()["3"] > 0


@pytest.mark.parametrize("edit, says", [
    (lambda csv: csv.replace("ImageId,ClassId,EncodedPixels", "ImageId,EncodedPixels"),
     r"missing column\(s\): ClassId"),
    (lambda csv: csv.replace(",3,", ",7,", 1), r"row \d+ \(\w+\.jpg\): unknown ClassId '7'; valid: 1, 2, 3, 4"),
    (lambda csv: _replace_first_rle(csv, "10 5 3 2"), r"row 2 \(\w+\.jpg, class \d\): malformed EncodedPixels: runs not sorted"),
    (lambda csv: _replace_first_rle(csv, "10 5 x"), r"row 2 .*malformed EncodedPixels: odd number of tokens"),
    (lambda csv: csv + "ghost.jpg,1,1 10\n", r"row \d+: image ghost\.jpg is listed in train\.csv but missing"),
    (lambda csv: csv + csv.splitlines()[1] + "\n", r"second row for class \d \(first at row 2\)"),
])
def test_severstal_bad_csv_names_the_row_and_problem(sheets, tmp_path, edit, says):
    root = copy_sheets(sheets, tmp_path)
    (root / "train.csv").write_text(edit((root / "train.csv").read_text()))
    with pytest.raises(DataError, match=says):
        data.build_manifest(severstal_cfg(root))


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def _replace_first_rle(csv: str, new: str) -> str:
    lines = csv.splitlines()
    image, cls, _ = lines[1].split(",")
    lines[1] = f"{image},{cls},{new}"
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("damage, says", [
    (lambda b: b[: len(b) // 2], "unreadable or truncated image"),
    (lambda b: b"", r"empty file \(0 bytes\)"),
    (lambda b: b"this is not a jpeg at all" * 10, "not an image"),
    (lambda b: synth.jpeg_bytes(np.zeros((256, 800), np.uint8)), r"size 800x256, expected 1600x256"),
    (lambda b: _png(np.full((256, 1600), 3000, np.uint16)), r"16-bit greyscale PNG \(mode I;16\): the models "
                                                             "take 8-bit images"),
])
def test_severstal_bad_images_fail_naming_the_file(sheets, tmp_path, damage, says):
    root = copy_sheets(sheets, tmp_path)
    victim = sorted((root / "train_images").iterdir())[3]
    victim.write_bytes(damage(victim.read_bytes()))
    with pytest.raises(DataError, match=f"{victim.name}.*{says}|{says}.*{victim.name}"):
        data.build_manifest(severstal_cfg(root))


def test_drop_mode_drops_only_bad_images_and_counts_them(sheets, tmp_path, caplog):
    root = copy_sheets(sheets, tmp_path)
    images = sorted((root / "train_images").iterdir())
    images[0].write_bytes(images[0].read_bytes()[:500])
    (root / "train.csv").write_text((root / "train.csv").read_text() + "ghost.jpg,2,1 3\n")
    with caplog.at_level(logging.WARNING):
        m = data.build_manifest(severstal_cfg(root, on_bad_input="drop"))
    assert len(m) == 23 and images[0].name not in set(m.records["image_id"])
    assert len(m.dropped) == 2
    assert "dropped 2 problem" in caplog.text and images[0].name in caplog.text and "ghost.jpg" in caplog.text


def test_all_problems_reported_at_once(sheets, tmp_path):
    root = copy_sheets(sheets, tmp_path)
    for victim in sorted((root / "train_images").iterdir())[:3]:
        victim.write_bytes(b"")
    with pytest.raises(DataError, match="3 problem"):
        data.build_manifest(severstal_cfg(root))


# --- NEU ------------------------------------------------------------------------------------------

def test_real_neu_has_200_per_class(neu_real):
    m = data.build_manifest(DataConfig(format="neu", root=str(neu_real)))
    assert len(m) == 1200
    assert m.class_counts() == {c: 200 for c in data.NEU_CLASSES}
    truth = pd.read_csv(neu_real / "labels.csv").set_index("filename")["label"]
    got = {iid: m.classes[x[0]] for iid, x in zip(m.records["image_id"], m.records["labels"])}
    assert got == truth.to_dict()


def test_neu_duplicates_dropped_before_split(tmp_path, caplog):
    synth.make_neu(str(tmp_path), 3, seed=1, workers=1)
    images = tmp_path / "images"
    shutil.copy(images / "patches_1.jpg", images / "patches_9.jpg")
    with caplog.at_level(logging.WARNING):
        m = data.build_manifest(DataConfig(format="neu", root=str(tmp_path)))
    assert len(m) == 18 and "patches_9.jpg" not in set(m.records["image_id"])
    assert "1 byte-identical duplicate" in caplog.text and "patches_9.jpg (= patches_1.jpg)" in caplog.text


def test_neu_class_subfolders_and_abbreviations(tmp_path):
    for i, cls in enumerate(data.NEU_CLASSES):
        (tmp_path / "by_class" / cls).mkdir(parents=True)
        (tmp_path / "by_class" / cls / f"img{i}.bmp").write_bytes(
            _bmp(synth.neu_image(0, i, cls)))
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "Cr_1.bmp").write_bytes(_bmp(synth.neu_image(0, 1, "crazing")))
    (tmp_path / "cls" / "PS_2.bmp").write_bytes(_bmp(synth.neu_image(0, 2, "pitted_surface")))
    m = data.build_manifest(DataConfig(format="neu", root=str(tmp_path / "by_class")))
    assert m.class_counts() == {c: 1 for c in data.NEU_CLASSES}
    m = data.build_manifest(DataConfig(format="neu", root=str(tmp_path / "cls")))
    assert [m.classes[x[0]] for x in m.records["labels"]] == ["crazing", "pitted_surface"]


def test_neu_unknown_class_names_the_file(tmp_path):
    synth.make_neu(str(tmp_path), 1, workers=1)
    shutil.copy(tmp_path / "images" / "scratches_1.jpg", tmp_path / "images" / "dents_1.jpg")
    with pytest.raises(DataError, match=r"dents_1\.jpg: cannot tell the class from the name \('dents'\)"):
        data.build_manifest(DataConfig(format="neu", root=str(tmp_path)))


def _bmp(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="BMP")
    return buf.getvalue()


# --- plain CSV ------------------------------------------------------------------------------------

@pytest.fixture
def plain(tmp_path):
    """Six small images and a CSV with a label column, 0/1 columns and a coil column."""
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(6):
        name = f"sheet{i}.jpg"
        (tmp_path / "imgs" / name).write_bytes(synth.jpeg_bytes(synth.neu_image(0, i, "scratches")))
        label = ["scratch", "dent", "", "scratch|dent", "dent", "scratch"][i]
        rows.append({"path": name, "label": label, "scratch": int("scratch" in label),
                     "dent": int("dent" in label), "coil": f"C{i // 2}"})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    return tmp_path


def csv_cfg(root, **kw):
    base = dict(format="csv", root=str(root), labels_csv="labels.csv", images_dir="imgs", image_column="path")
    return DataConfig(**{**base, **kw})


def test_csv_label_column_with_separator(plain):
    m = data.build_manifest(csv_cfg(plain, label_separator="|"))
    assert m.classes == ["dent", "scratch"]
    assert list(m.records["labels"]) == [[1], [0], [], [0, 1], [0], [1]]


def test_csv_one_column_per_class_and_groups(plain):
    m = data.build_manifest(csv_cfg(plain, label_columns=["scratch", "dent"], group_column="coil"))
    assert m.classes == ["scratch", "dent"]
    assert list(m.records["labels"]) == [[0], [1], [], [0, 1], [1], [0]]
    assert list(m.records["group"]) == ["C0", "C0", "C1", "C1", "C2", "C2"]


@pytest.mark.parametrize("kw, edit, says", [
    (dict(label_columns=["defect"]), None, r"missing column\(s\) defect; the file has: path, label"),
    (dict(classes=["scratch"]), None, r"row 3 \(sheet1\.jpg\): unknown label 'dent'; valid: scratch"),
    (dict(label_columns=["scratch", "dent"]), lambda t: t.replace(",1,0,C0", ",7,0,C0", 1),
     r"row 2 \(sheet0\.jpg\): column scratch must be 0 or 1, got '7'"),
    (dict(verify_images=False), lambda t: t + "ghost.jpg,dent,0,1,C9\n", r"row 8: image ghost\.jpg is listed but missing"),
    (dict(), lambda t: t + "ghost.jpg,dent,0,1,C9\n", r"row 8: image ghost\.jpg is listed but missing"),
    (dict(), lambda t: t + t.splitlines()[1] + "\n", r"row 8: image sheet0\.jpg already listed at row 2"),
])
def test_csv_bad_input(plain, kw, edit, says):
    if edit:
        (plain / "labels.csv").write_text(edit((plain / "labels.csv").read_text()))
    with pytest.raises(DataError, match=says):
        data.build_manifest(csv_cfg(plain, **{"label_separator": "|", **kw}))


# --- S3 -------------------------------------------------------------------------------------------

def test_every_reader_works_on_s3(bucket, sheets, plain):
    fs = s3fs.S3FileSystem()
    fs.put(str(sheets.root) + "/", f"{bucket}/sev/", recursive=True)
    fs.put(str(plain) + "/", f"{bucket}/plain/", recursive=True)
    synth.make_neu(f"{bucket}/neu", 2, seed=3, workers=1)

    sev = data.build_manifest(severstal_cfg(f"{bucket}/sev"))
    local = data.build_manifest(severstal_cfg(sheets.root))
    assert sev.records["uri"].str.startswith(f"{bucket}/sev/train_images/").all()
    pd.testing.assert_frame_equal(sev.records.drop(columns="uri"), local.records.drop(columns="uri"))

    neu = data.build_manifest(DataConfig(format="neu", root=f"{bucket}/neu"))
    assert neu.class_counts() == {c: 2 for c in data.NEU_CLASSES}

    csvm = data.build_manifest(csv_cfg(f"{bucket}/plain", label_separator="|"))
    assert len(csvm) == 6 and csvm.records["uri"].iloc[0] == f"{bucket}/plain/imgs/sheet0.jpg"
    assert images.load_image(csvm.records["uri"].iloc[0]).shape == (200, 200, 1)


def test_bad_image_on_s3_is_named(bucket, sheets):
    fs = s3fs.S3FileSystem()
    fs.put(str(sheets.root) + "/", f"{bucket}/sev/", recursive=True)
    victim = sorted(fs.ls(f"{bucket}/sev/train_images"))[0]
    fs.pipe(victim, fs.cat(victim)[:300])
    with pytest.raises(DataError, match=f"s3://{victim}: unreadable or truncated"):
        data.build_manifest(severstal_cfg(f"{bucket}/sev"))


def test_s3_folder_markers_are_not_listed_as_files(bucket):
    import boto3

    client = boto3.client("s3")
    name = bucket[len("s3://"):]
    for key in ["in/", "in/a.jpg", "in/sub/", "in/sub/b.JPG", "in/empty/"]:  # markers: empty keys ending in /
        client.put_object(Bucket=name, Key=key, Body=b"" if key.endswith("/") else b"x")
    for prefix in (f"{bucket}/in", f"{bucket}/in/"):
        assert storage.list_files(prefix) == [f"{bucket}/in/a.jpg", f"{bucket}/in/sub/b.JPG"]
    assert storage.list_files(f"{bucket}/in", suffixes=(".jpg",)) == [f"{bucket}/in/a.jpg", f"{bucket}/in/sub/b.JPG"]


def test_s3_endpoint_and_keys_from_config_not_only_env(bucket, s3_endpoint, monkeypatch, sheets):
    from steelray.storage import S3Config

    fs = s3fs.S3FileSystem()
    fs.put(str(sheets.root) + "/", f"{bucket}/sev/", recursive=True)
    for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    s3 = S3Config(endpoint_url=s3_endpoint, access_key_id="k", secret_access_key="s")
    assert len(data.build_manifest(severstal_cfg(f"{bucket}/sev", verify_images=False), s3)) == 24


# --- decoding -------------------------------------------------------------------------------------

def test_gray_stored_as_rgb_becomes_one_channel(severstal_real):
    blob = next((severstal_real / "train_images").iterdir()).read_bytes()
    one = images.decode_image(blob, 1)
    three = images.decode_image(blob, 3)
    assert one.shape == (256, 1600, 1) and three.shape == (256, 1600, 3)
    assert np.abs(three[..., 0].astype(int) - one[..., 0]).max() <= 1


def test_one_channel_repeated_for_three():
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(buf, format="PNG")
    out = images.decode_image(buf.getvalue(), 3)
    assert out.shape == (8, 8, 3) and (out[..., 0] == out[..., 2]).all()



def _encodings(sheet: bytes) -> dict[str, bytes]:
    """The sheet re-encoded the ways cameras and tools write JPEGs."""
    import io

    from PIL import Image

    im, out = Image.open(io.BytesIO(sheet)), {"as written": sheet}
    for name, mode, kw in [("progressive", "L", dict(progressive=True)), ("optimised", "L", dict(optimize=True)),
                           ("restart markers", "L", dict(restart_marker_blocks=3)),
                           ("progressive with restarts", "L", dict(progressive=True, restart_marker_rows=1)),
                           ("exif", "L", dict(exif=b"Exif\x00\x00" + bytes(range(256)) * 4)),
                           ("rgb 4:4:4", "RGB", dict(subsampling=0)), ("rgb progressive", "RGB", dict(progressive=True))]:
        buf = io.BytesIO()
        im.convert(mode).save(buf, format="JPEG", **kw)
        out[name] = buf.getvalue()
    return out


def _libjpeg_rejects(blob: bytes) -> bool:
    """PIL's libjpeg decoding the whole image, without steelray's structure check."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as im:
            im.convert("L")
        return False
    except Exception:  # OSError, SyntaxError, DecompressionBombError: rejected either way
        return True


def test_sound_jpegs_pass_the_structure_check(sheets, request):
    blobs = [p.read_bytes() for p in sorted(Path(sheets.images).iterdir())[:3]]
    try:  # the real sample too where it is present; the synthetic sheets alone where not
        blobs += [p.read_bytes() for p in sorted((request.getfixturevalue("severstal_real") / "train_images").iterdir())]
    except pytest.skip.Exception:
        pass
    for blob in blobs[:1] + blobs[-1:]:
        for name, encoded in _encodings(blob).items():
            assert images.jpeg_structure_error(encoded) is None, name
            images.probe_image(encoded, name)
    assert all(images.jpeg_structure_error(b) is None for b in blobs)


def _with(blob: bytes, at: int, new: bytes) -> bytes:
    return blob[:at] + new + blob[at + len(new):]


@pytest.mark.parametrize("damage, says", [
    (lambda b: _with(b, len(b) // 2, b"\xff\xc1\x00\x0b"), "a second frame header"),
    (lambda b: _with(b, len(b) // 2, b"\xff\x05"), "marker 0xFF05 where none can be"),
    (lambda b: _with(b, len(b) // 2, b"\xff\xd3"), "restart marker out of place"),
    (lambda b: _with(b, b.index(b"\xff\xc4") + 5, b"\x03\x03"), "a bad Huffman table"),  # 1+3+3 codes of <= 2 bits
    (lambda b: _with(b, b.index(b"\xff\xdb") + 4, b"\x27"), "not an image"),  # PIL's header parse says so
    (lambda b: b[:len(b) // 2] + b[b.index(b"\xff\xda"):], "a second scan of the same component"),
    (lambda b: _with(b, len(b) // 2, b"\xff\xc4\xff\xf0"), "runs past the end"),
])
def test_broken_jpeg_structure_is_named(sheets, damage, says):
    """Each a JPEG that libjpeg refuses or decodes to a damaged picture; the probe names it."""
    blob = damage(next(Path(sheets.images).iterdir()).read_bytes())
    assert blob[:2] == b"\xff\xd8" and blob[-2:] == b"\xff\xd9"
    with pytest.raises(DataError, match=f"sheet.jpg: (unreadable or truncated image \\(corrupt JPEG data: .*)?({says})"):
        images.probe_image(blob, "sheet.jpg")
    with pytest.raises(DataError, match=says):
        images.decode_image(blob, 1, "sheet.jpg")


def test_truncated_and_huge_headers_are_errors_not_crashes(sheets):
    blob = next(Path(sheets.images).iterdir()).read_bytes()
    assert images.jpeg_structure_error(blob[:len(blob) // 2]) is None  # no end marker: the decoder says truncated
    with pytest.raises(DataError, match="truncated"):
        images.decode_image(blob[:len(blob) // 2], 1, "half.jpg")
    sof = blob.index(b"\xff\xc0")
    huge = _with(blob, sof + 5, b"\xfe\x21\x98\xc8")  # 65,057 x 39,112 pixels claimed
    with pytest.raises(DataError, match="huge.jpg: unreadable image .*exceeds limit"):
        images.probe_image(huge, "huge.jpg")


def test_the_probe_rejects_every_jpeg_libjpeg_rejects(sheets):
    """Random damage (noise, cuts, insertions; in the data and in the tables) to synthetic sheets in
    three encodings: whatever libjpeg refuses to decode, the header probe refuses too, without
    decoding (benchmarks/jpeg_check.py runs this at scale on real sheets)."""
    encodings = _encodings(next(Path(sheets.images).iterdir()).read_bytes())
    pool = [encodings[k] for k in ("as written", "progressive with restarts", "rgb 4:4:4")]
    rng, rejected, missed = np.random.default_rng(0), 0, []
    for trial in range(400):
        b = synth.damaged(pool[trial % 3], rng, "header" if trial % 2 else "anywhere")
        if _libjpeg_rejects(b):
            rejected += 1
            try:
                images.probe_image(b)
                missed.append(trial)
            except DataError:
                pass
    assert rejected > 60 and not missed, (rejected, missed)


# --- splits and targets ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def neu_synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("neu")
    synth.make_neu(str(root), 20, seed=5, workers=1)
    return data.build_manifest(DataConfig(format="neu", root=str(root)))


def test_split_is_deterministic_stratified_and_disjoint(neu_synth):
    cfg = DataConfig(format="neu", val_fraction=0.25, seed=1)
    train, val = data.split(neu_synth, cfg)
    again_train, again_val = data.split(neu_synth, cfg)
    assert list(val.records["image_id"]) == list(again_val.records["image_id"])
    assert set(train.records["image_id"]).isdisjoint(val.records["image_id"])
    assert len(train) + len(val) == len(neu_synth) == 120
    assert val.class_counts() == {c: 5 for c in data.NEU_CLASSES}
    other = data.split(neu_synth, DataConfig(format="neu", val_fraction=0.25, seed=2))[1]
    assert set(other.records["image_id"]) != set(val.records["image_id"])


def test_split_keeps_groups_together(neu_synth):
    m = neu_synth.subset(np.arange(len(neu_synth)))
    m.records["group"] = [f"coil{i // 4}" for i in range(len(m))]
    train, val = data.split(m, DataConfig(format="neu", val_fraction=0.3, seed=0))
    assert set(train.records["group"]).isdisjoint(val.records["group"])


def test_kfold_partitions_every_image_once(neu_synth):
    vals = [data.split(neu_synth, DataConfig(format="neu", folds=4, fold=k, seed=3))[1] for k in range(4)]
    seen = Counter(i for v in vals for i in v.records["image_id"])
    assert len(seen) == 120 and set(seen.values()) == {1}
    assert all(v.class_counts() == {c: 5 for c in data.NEU_CLASSES} for v in vals)


def test_targets_per_task(sheets):
    m = data.build_manifest(severstal_cfg(sheets.root))
    multi = m.targets("multilabel")
    assert multi.shape == (24, 4)
    np.testing.assert_array_equal(m.targets("binary"), multi.max(axis=1))
    if (multi.sum(axis=1) != 1).any():
        with pytest.raises(DataError, match="multiclass needs exactly one label"):
            m.targets("multiclass")
