import glob

import pytest
import yaml

from steelray import config
from steelray.config import ConfigError

EXAMPLES = sorted(p for p in glob.glob("jobs/configs/*.yaml") if not p.rsplit("/", 1)[1].startswith("score"))


def test_four_example_configs_load():
    names = {p.rsplit("/", 1)[1] for p in EXAMPLES}
    assert {"severstal_multilabel.yaml", "severstal_binary.yaml", "severstal_segmentation.yaml",
            "neu.yaml"} <= names
    tasks = {config.load(p).task for p in EXAMPLES}
    assert tasks == {"binary", "multilabel", "multiclass", "segmentation"}


def test_overrides_are_typed():
    cfg = config.load("jobs/configs/neu.yaml", ["train.lr=3e-4", "train.epochs=3", "input.size=[64, 64]",
                                                 "ray.use_gpu=true", "data.classes=[a, b]"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 3
    assert cfg.input.size == [64, 64]
    assert cfg.ray.use_gpu is True
    assert cfg.data.classes == ["a", "b"]


@pytest.mark.parametrize("override, says", [
    (["train.lrr=1"], r"train\.lrr: unknown key; valid keys in train: epochs, batch_size, lr"),
    (["trian.lr=1"], r"trian: unknown key; valid keys: task, data"),
    (["train.epochs=abc"], r"train\.epochs: expected int, got 'abc'"),
    (["train.epochs=1.5"], r"train\.epochs: expected int"),
    (["train.epochs=0"], r"train\.epochs: must be >= 1, got 0"),
    (["data.val_fraction=1.5"], r"data\.val_fraction: must be <= 0\.9"),
    (["train.scheduler=step"], r"train\.scheduler: 'step' is not a valid choice; choose one of: none, cosine"),
    (["task=detect"], r"task: 'detect' is not a valid choice; choose one of: binary, multilabel, multiclass, segmentation"),
    (["ray.use_gpu=maybe"], r"ray\.use_gpu: expected bool"),
    (["input.size=224"], r"input\.size: expected a list of int"),
    (["data.fold=3", "data.folds=3"], r"data\.fold: must be < data\.folds"),
    (["train.lr"], r"expected key\.sub=value"),
])
def test_bad_values_name_the_key_and_the_choices(override, says):
    with pytest.raises(ConfigError, match=says):
        config.load("jobs/configs/severstal_multilabel.yaml", override)


def test_yaml_unknown_key_and_bad_section(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  formt: neu\n")
    with pytest.raises(ConfigError, match="data.formt: unknown key; valid keys in data: format, root"):
        config.load(str(p))
    p.write_text("data: 3\n")
    with pytest.raises(ConfigError, match="data: expected a section"):
        config.load(str(p))


def test_segmentation_needs_masks():
    with pytest.raises(ConfigError, match="segmentation needs masks"):
        config.load(None, ["task=segmentation", "data.format=neu"])


def test_saved_config_round_trips_and_hides_secrets(tmp_path):
    cfg = config.load("jobs/configs/neu.yaml", ["s3.access_key_id=AKIAEXAMPLE", "s3.secret_access_key=hush"])
    assert "hush" not in repr(cfg) and "AKIAEXAMPLE" not in repr(cfg)
    out = config.save(cfg, str(tmp_path / "run" / "config.yaml"))
    text = open(out).read()
    assert "hush" not in text and "AKIAEXAMPLE" not in text
    assert yaml.safe_load(text)["s3"]["secret_access_key"] == config.SECRET_MASK
    again = config.load(out)
    assert config.to_dict(again, redact=False)["train"] == config.to_dict(cfg)["train"]
    assert again.data == cfg.data


def test_config_saved_to_s3(bucket):
    cfg = config.load("jobs/configs/severstal_binary.yaml")
    uri = config.save(cfg, f"{bucket}/runs/x/config.yaml")
    assert config.load(uri) == cfg


def test_score_job_config(tmp_path):
    nightly = config.load("jobs/configs/score_nightly.yaml", ["score.input=/data/tonight.txt"], config.ScoreJob)
    assert nightly.score.input == "/data/tonight.txt" and nightly.score.min_area == [500, 500, 1000, 2000]
    path = tmp_path / "score.yaml"
    path.write_text("score:\n  run_date: 2026-11-22\n  expect_size: [256, 1600]\n  suffixes: [.jpg]\n")
    job = config.load(str(path), ["score.batch_size=64"], config.ScoreJob)
    assert (job.score.run_date, job.score.batch_size, job.score.suffixes) == ("2026-11-22", 64, [".jpg"])
    with pytest.raises(config.ConfigError, match=r"score.run_date: expected YYYY-MM-DD, got '22/11/2026'"):
        config.load(None, ["score.run_date=22/11/2026"], config.ScoreJob)
    with pytest.raises(config.ConfigError, match=r"score.run_date: expected YYYY-MM-DD, got '2026-13-01'"):
        config.load(None, ["score.run_date=2026-13-01"], config.ScoreJob)  # YAML's date reader raised ValueError
    path.write_text("score:\n  run_date: 2026-02-30\n")
    with pytest.raises(config.ConfigError, match=r"score.yaml: not valid YAML: day is out of range"):
        config.load(str(path), [], config.ScoreJob)
    with pytest.raises(config.ConfigError, match="score.expect_size"):
        config.load(None, ["score.expect_size=[256]"], config.ScoreJob)
    with pytest.raises(config.ConfigError, match="score.device: 'tpu' is not a valid choice"):
        config.load(None, ["score.device=tpu"], config.ScoreJob)
    with pytest.raises(config.ConfigError, match=r"score.min_area: must be >= 0 per class, got \[-1\]"):
        config.load(None, ["score.min_area=[-1]"], config.ScoreJob)
    # the other jobs' own rules (job_configs: each *Job's check)
    with pytest.raises(config.ConfigError, match=r"synth.class_freq: 4 relative frequencies .*not all 0"):
        config.load(None, ["synth.class_freq=[0,0,0,0]"], config.SynthJob)
    with pytest.raises(config.ConfigError, match="report.night: expected YYYY-MM-DD, got 'yesterday'"):
        config.load(None, ["report.night=yesterday"], config.NightReportJob)
