"""The entry scripts, run as a user runs them."""

import subprocess
import sys

import pandas as pd


def test_demo_generates_and_reads_back(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run([sys.executable, "jobs/demo.py", "--out", str(out), "--n", "12"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "generated 12 synthetic sheets" in run.stdout
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert len(manifest) == 12 and set(manifest.columns) >= {"image_id", "uri", "labels", "rles", "group"}
    for line in ("images", "labels", "manifest", "config"):
        assert f"  {line} " in run.stdout
    assert (out / "config.yaml").exists() and (out / "data" / "train.csv").exists()
