"""Deployment: what a scheduler sees of the jobs (the night's date from a fixed entrypoint, the exit
codes), the KubeRay manifests against KubeRay's own CRD schemas, the image and the runtime_env.
The install they share (.ci/install) is tests/test_install.py's."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest

from steelray import config
from steelray.scoring.inputs import expand_input, night
from steelray.scoring.plan import ScoreError

REPO = Path(__file__).resolve().parents[1]


def score_cfg(*overrides):
    return config.load(None, list(overrides), config.ScoreJob).score


# --- the night's date --------------------------------------------------------------------------------

def test_the_night_is_today_where_the_plant_is_shifted_by_the_offset():
    at = dt.datetime(2026, 12, 3, 23, 30, tzinfo=dt.timezone.utc)  # already the 4th in Berlin
    assert night(score_cfg(), at) == dt.date(2026, 12, 3)
    assert night(score_cfg("score.run_timezone=Europe/Berlin"), at) == dt.date(2026, 12, 4)
    assert night(score_cfg("score.run_timezone=Europe/Berlin", "score.run_date_offset=-1"), at) == dt.date(2026, 12, 3)
    assert night(score_cfg("score.run_date_offset=-1"), dt.datetime(2026, 3, 1, 1, tzinfo=dt.timezone.utc)) == \
        dt.date(2026, 2, 28)
    # a date given wins over the clock (a backfill)
    assert night(score_cfg("score.run_date=2026-11-22", "score.run_date_offset=-1"), at) == dt.date(2026, 11, 22)
    with pytest.raises(config.ConfigError, match="score.run_timezone: 'Mars/Olympus' is not an IANA time zone"):
        score_cfg("score.run_timezone=Mars/Olympus")


def test_run_date_placeholders_in_the_input_expand_and_others_are_refused():
    d = dt.date(2026, 12, 2)
    assert expand_input("s3://plant/incoming/{run_date}/", d) == "s3://plant/incoming/2026-12-02/"
    assert expand_input("s3://plant/{run_date:%Y/%m/%d}/cam-1/", d) == "s3://plant/2026/12/02/cam-1/"
    assert expand_input("/data/night.txt", d) == "/data/night.txt"
    assert expand_input("/data/{{raw}}/{run_date}", d) == "/data/{raw}/2026-12-02"
    with pytest.raises(ScoreError, match=r"unknown placeholder\(s\) \{date\}; the only one is \{run_date\}"):
        expand_input("s3://plant/incoming/{date}/", d)
    with pytest.raises(ScoreError, match="a literal brace is written"):
        expand_input("s3://plant/incoming/{run_date/", d)


# --- exit codes: the nightly job provoked into each -------------------------------------------------

def test_the_nightly_job_exits_with_each_code_of_the_table(ray_local, tmp_path, sheets, load_job, capsys):
    """Through jobs/score.py's main: 0 (last night's folder named by the fixed entrypoint), 3 (another
    run holds the output), 2 (bad arguments), 1 (the output read back holds an input twice)."""
    import os
    import shutil
    import zoneinfo

    import pandas as pd
    import torch

    from steelray import checkpoint, data, models, storage
    from steelray.scoring.lock import RunLock
    from steelray.scoring.plan import describe, file_tag

    cfg = config.load(None, ["task=multilabel", "model.name=simple_cnn", "input.size=[32,160]", "data.format=severstal"])
    torch.manual_seed(0)
    ckpt = str(tmp_path / "ckpt")
    checkpoint.write(ckpt, models.build_model(cfg, 4), checkpoint.make_meta(cfg, data.SEVERSTAL_CLASSES,
                                                                             models.preprocess_for(cfg)))
    yesterday = dt.datetime.now(zoneinfo.ZoneInfo("Asia/Tokyo")).date() - dt.timedelta(days=1)
    incoming = tmp_path / "incoming" / yesterday.isoformat()
    names = sorted(os.listdir(sheets.images))[:3]
    for name in names:
        storage.write_bytes(str(incoming / name), storage.read_bytes(os.path.join(sheets.images, name)))
    out = str(tmp_path / "out")
    score = load_job("score").main
    argv = ["--input", str(tmp_path / "incoming" / "{run_date}"), "--checkpoint", ckpt, "--output", out,
            "score.run_timezone=Asia/Tokyo", "score.run_date_offset=-1", "score.decode_batch=2"]

    assert score(argv) == 0, capsys.readouterr().err
    part = tmp_path / "out" / f"run_date={yesterday.isoformat()}"
    assert sorted(pd.read_parquet(part).image_id) == names   # last night's folder, last night's partition

    with RunLock(out, file_tag(describe(ckpt).digest), what="the other night's job"):
        assert score(argv) == 3
    assert "another scoring job with this model is writing this output" in capsys.readouterr().err

    assert score([*argv[:-3], "--input", str(tmp_path / "incoming" / "{date}")]) == 2
    assert "unknown placeholder(s) {date}" in capsys.readouterr().err
    assert score([*argv[:2], "--checkpoint", str(tmp_path / "nope"), *argv[4:]]) == 2
    assert "not a steelray checkpoint" in capsys.readouterr().err

    # a copy of a night's file (a botched sync) puts its rows in twice: the check after the write sees it
    first = next(f for f in os.listdir(part) if f.endswith(".parquet"))
    shutil.copy(part / first, part / f"copy-{first}")
    storage.write_bytes(str(incoming / "late.jpg"), storage.read_bytes(os.path.join(sheets.images, names[0])))
    assert score(argv) == 1
    err = capsys.readouterr().err
    assert "failed verification: 0 input(s) missing" in err and "3 duplicated" in err, err


# --- KubeRay manifests against KubeRay v1.7's own CRD schemas ------------------------------------------

KUBERAY = REPO / "deploy" / "kuberay"
CRDS = REPO.parent / "shared" / "schemas" / "kuberay"


def strict(schema):
    """A Kubernetes structural schema as JSON Schema, as strict as `kubectl apply --validate=strict`:
    a field the schema does not name is an error (unless the schema preserves unknown fields),
    int-or-string means either, nullable admits null. CEL rules (x-kubernetes-validations) are not
    evaluated."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out and \
            not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def validators():
    import jsonschema
    import yaml

    if not CRDS.is_dir():
        pytest.skip(f"KubeRay's CRD schemas not present at {CRDS} (only the team's machines have ../shared/schemas)")
    out = {}
    for path in CRDS.glob("ray.io_*.yaml"):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            schema = strict(version["schema"]["openAPIV3Schema"])
            out[(f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])] = \
                jsonschema.Draft7Validator(schema)
    return out


def problems(validators, doc: dict) -> list[str]:
    validator = validators.get((doc.get("apiVersion"), doc.get("kind")))
    if validator is None:
        return [f"no KubeRay v1.7 schema for {doc.get('apiVersion')} {doc.get('kind')}"]
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


def manifests() -> dict[str, dict]:
    import yaml

    return {p.name: doc for p in sorted(KUBERAY.glob("*.yaml")) for doc in yaml.safe_load_all(p.read_text())
            if doc and doc["apiVersion"].startswith("ray.io/")}


def test_every_kuberay_manifest_is_valid_against_kuberays_own_schemas(validators):
    found = manifests()
    assert {(d["kind"]) for d in found.values()} == {"RayCluster", "RayJob", "RayCronJob"}
    for name, doc in found.items():
        assert problems(validators, doc) == [], name


def test_a_misspelt_field_or_a_wrong_type_fails_the_validation(validators):
    import copy

    job = manifests()["raycronjob-score.yaml"]
    bad = copy.deepcopy(job)
    bad["spec"]["jobTemplate"]["shutdownAfterJobFinish"] = bad["spec"]["jobTemplate"].pop("shutdownAfterJobFinishes")
    assert any("'shutdownAfterJobFinish' was unexpected" in p for p in problems(validators, bad))
    bad = copy.deepcopy(job)
    bad["spec"]["jobTemplate"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = "8"
    assert any("workerGroupSpecs.0.maxReplicas: '8' is not of type 'integer'" in p for p in problems(validators, bad))
    bad = copy.deepcopy(job)  # deep inside the pod template (the Kubernetes core types are in the CRD)
    container = bad["spec"]["jobTemplate"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    container["imagePulPolicy"] = container.pop("imagePullPolicy")
    assert any("'imagePulPolicy' was unexpected" in p for p in problems(validators, bad))
    bad = copy.deepcopy(manifests()["raycluster.yaml"])
    del bad["spec"]["headGroupSpec"]
    assert any("'headGroupSpec' is a required property" in p for p in problems(validators, bad))
    bad = copy.deepcopy(job)
    bad["spec"]["timeZone"] = ""
    assert any("spec.timeZone" in p for p in problems(validators, bad))


def cluster_specs() -> dict[str, dict]:
    found = manifests()
    return {"raycluster.yaml": found["raycluster.yaml"]["spec"],
            "rayjob-train.yaml": found["rayjob-train.yaml"]["spec"]["rayClusterSpec"],
            "raycronjob-score.yaml": found["raycronjob-score.yaml"]["spec"]["jobTemplate"]["rayClusterSpec"]}


def test_the_manifests_share_one_cluster_and_keep_secrets_out():
    specs = cluster_specs()
    assert specs["rayjob-train.yaml"] == specs["raycluster.yaml"] == specs["raycronjob-score.yaml"]
    spec = specs["raycluster.yaml"]
    assert spec["authOptions"] == {"mode": "token"} and spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["resources"] == {"trial_driver": "4"}   # where Tune's trial drivers run
    gpu = spec["workerGroupSpecs"][0]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    pods = [spec["headGroupSpec"]["template"]["spec"], gpu["template"]["spec"]]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["template"]["spec"]["nodeSelector"]
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"]:
            assert {"secretRef": {"name": "steelray-s3"}} in c["envFrom"]   # S3 by reference
            for env in c.get("env", []):
                assert not (re.search(r"KEY|SECRET|TOKEN|PASSWORD", env["name"]) and "value" in env), env
    text = "".join(p.read_text() for p in KUBERAY.glob("*.yaml"))
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key\s*[:=]\s*[A-Za-z0-9/+]{20}", text, re.I)  # no key


def test_the_image_the_manifests_run_is_the_dockerfiles_ray_and_the_configs_load(tmp_path):
    import ray

    base = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\S+?)-py(\d)(\d+)-gpu$", (REPO / "deploy" / "Dockerfile").read_text(), re.M)
    assert base, "deploy/Dockerfile: FROM Ray's own GPU image"
    assert base.group(1) == ray.__version__  # the Ray the suite runs on is the image's
    for spec in cluster_specs().values():
        assert spec["rayVersion"] == ray.__version__
    # the ConfigMap's configs are valid configs of the jobs the manifests run
    import yaml

    configmap = yaml.safe_load((KUBERAY / "config.yaml").read_text())
    for key, cls in (("train.yaml", config.Config), ("score.yaml", config.ScoreJob)):
        (tmp_path / key).write_text(configmap["data"][key])
        config.load(str(tmp_path / key), [], cls)
    score = config.load(str(tmp_path / "score.yaml"), [], config.ScoreJob).score
    cron = manifests()["raycronjob-score.yaml"]["spec"]
    assert score.run_timezone == cron["timeZone"] and "{run_date}" in score.input and score.run_date_offset == -1
    # daily, with a deadline shorter than the day: two nights cannot overlap
    assert re.fullmatch(r"\d+ \d+ \* \* \*", cron["schedule"])
    assert cron["jobTemplate"]["activeDeadlineSeconds"] < 24 * 3600
    assert cron["jobTemplate"]["backoffLimit"] == 0


@pytest.mark.parametrize("codes, attempts, final", [
    ([0], 1, 0), ([2], 1, 2), ([1, 0], 2, 0), ([3, 3, 0], 3, 0), ([1, 1, 1], 3, 1), ([3, 2], 2, 2)])
def test_the_nightly_entrypoint_retries_by_exit_code(tmp_path, codes, attempts, final):
    """The RayCronJob's entrypoint (deploy/nightly.sh), run by sh with a stand-in for python that
    exits with ``codes`` in turn."""
    import os
    import shutil
    import subprocess

    entrypoint = manifests()["raycronjob-score.yaml"]["spec"]["jobTemplate"]["entrypoint"]
    assert entrypoint == "cd /home/ray/steelray && sh deploy/nightly.sh --config /config/score.yaml"
    assert "COPY --chown=ray:users deploy/nightly.sh deploy/nightly.sh" in (REPO / "deploy" / "Dockerfile").read_text()
    (tmp_path / "bin").mkdir()
    (tmp_path / "deploy").mkdir()
    shutil.copy(REPO / "deploy" / "nightly.sh", tmp_path / "deploy" / "nightly.sh")
    (tmp_path / "codes").write_text("\n".join(map(str, codes)) + "\n")
    stub = tmp_path / "bin" / "python"
    stub.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/calls\ncode=$(head -n1 {tmp_path}/codes)\n"
                    f"sed -i 1d {tmp_path}/codes\nexit $code\n")
    stub.chmod(0o755)
    run = subprocess.run(["sh", "-c", entrypoint.replace("cd /home/ray/steelray", f"cd {tmp_path}")],
                         env={"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "STEELRAY_BUSY_WAIT_S": "0"},
                         capture_output=True, text=True, timeout=60)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert run.returncode == final and len(calls) == attempts, run.stdout + run.stderr
    assert set(calls) == {"jobs/score.py --config /config/score.yaml"}


def test_the_runtime_env_is_rays_and_lists_the_projects_dependencies():
    import tomllib

    import yaml
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(**yaml.safe_load((REPO / "deploy" / "runtime-env.yaml").read_text()))  # Ray's own checks
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [d for d in project["dependencies"] if not d.startswith("ray")] + project["optional-dependencies"]["export"]
    assert env["uv"]["packages"] == wanted
    assert "tests/" in env["excludes"]


def test_the_exit_code_table_is_every_jobs_own():
    """docs/deploy.md's table: for each code, exactly the jobs whose EXIT_CODES have it."""
    import ast

    table = {}
    for line in (REPO / "docs" / "deploy.md").read_text().splitlines():
        row = re.match(r"\| (\d) \|.*\| ([^|]+) \|$", line)
        if row:
            table[int(row.group(1))] = set(re.findall(r"`(\w+)`", row.group(2)))
    from steelray import cli

    names = {"DONE": cli.DONE, "FAILED": cli.FAILED, "BAD_ARGUMENTS": cli.BAD_ARGUMENTS, "BUSY": cli.BUSY,
             "ALERT": cli.ALERT}
    jobs = {}
    for path in sorted((REPO / "jobs").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "EXIT_CODES":
                jobs[path.stem] = {names[k.attr] for k in node.value.keys}
    assert set(jobs) == {p.stem for p in (REPO / "jobs").glob("*.py")}, "a job without EXIT_CODES"
    assert table == {code: {j for j, codes in jobs.items() if code in codes} for code in table}
    assert set(table) == set().union(*jobs.values())
