"""One scoring job per output and model version: the lock file, locally and on S3 (moto's server)."""

import json
import logging
import socket
import subprocess
import sys
import time

import pytest

from steelray import storage
from steelray.scoring.lock import OutputBusy, RunLock


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    return request.getfixturevalue("bucket") + "/predictions"


def plant(output: str, digest: str, **held) -> None:
    """A lock file as another job would have left it."""
    info = {"token": "theirs", "host": socket.gethostname(), "pid": 1, "what": "resnet18 on s3://x/",
            "started": time.time() - 60, "beat": time.time(), **held}
    storage.write_bytes(storage.join(output, "_running", f"{digest}.json"), json.dumps(info).encode())


def test_a_second_job_is_refused_until_the_first_releases(output):
    first = RunLock(output, "abc", settle=0.05)
    first.acquire()
    with pytest.raises(OutputBusy, match=r"another scoring job with this model is writing this output \(host "
                                       rf"{socket.gethostname()}, pid \d+") as e:
        RunLock(output, "abc", settle=0.05).acquire()
    assert "wait 300 s after its last sign, or delete the file" in str(e.value)
    with RunLock(output, "other-version", settle=0.05):  # another model version writes beside it
        pass
    first.release()
    assert not storage.isdir(storage.join(output, "_running")) or \
        not storage.list_files(storage.join(output, "_running"))
    with RunLock(output, "abc", settle=0.05):
        pass


def test_a_lock_whose_job_is_gone_is_taken_over_and_a_live_one_is_not(output, caplog):
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    cases = [({"pid": ended.pid}, f"its process {ended.pid} has ended"),
             ({"host": "another-node", "beat": time.time() - 400}, "no sign of it for 400 s (score.lock_ttl=300)")]
    for held, why in cases:
        plant(output, "abc", **held)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="steelray.scoring.lock"), RunLock(output, "abc", settle=0.05):
            assert why in caplog.text and "taking over from the job on" in caplog.text
    plant(output, "abc", host="another-node", beat=time.time() - 100)  # quiet, but not for ttl yet
    with pytest.raises(OutputBusy, match="host another-node, pid 1, resnet18 on s3://x/"):
        RunLock(output, "abc", settle=0.05).acquire()
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # another process on this host, still running
        plant(output, "abc", pid=running.pid)
        with pytest.raises(OutputBusy, match=f"pid {running.pid}, "):
            RunLock(output, "abc", settle=0.05).acquire()
    finally:
        running.kill()
        running.wait()


def test_the_holder_renews_its_lock_while_it_runs(tmp_path):
    uri = str(tmp_path / "out" / "_running" / "abc.json")
    with RunLock(str(tmp_path / "out"), "abc", ttl=1.0, beat=0.1):
        first = json.loads(storage.read_bytes(uri))["beat"]
        time.sleep(0.5)
        assert json.loads(storage.read_bytes(uri))["beat"] > first + 0.2


def test_an_output_the_job_cannot_write_is_a_clear_error(tmp_path):
    from steelray.scoring.lock import LockError

    (tmp_path / "out").write_text("a file where the output folder should be")
    with pytest.raises(LockError, match=r"out/_running/abc.json: could not create the run lock: "):
        RunLock(str(tmp_path / "out"), "abc").acquire()


@pytest.mark.parametrize("store", ["ignore", "refuse"])
def test_an_s3_store_without_conditional_writes(store, flaky_s3, bucket):
    """An S3-compatible store that ignores If-None-Match still refuses a second job (the lock is
    looked for before it is written); one that refuses it is a clear error with the way out."""
    from steelray.storage import S3Config
    from steelray.scoring.lock import LockError

    flaky_s3.conditional = store
    via = S3Config(endpoint_url=flaky_s3.endpoint)
    if store == "refuse":
        with pytest.raises(LockError, match=r"_running/abc.json: could not create the run lock: OSError: "
                                            r".*set score.lock_ttl=0 and run one job at a time"):
            RunLock(bucket, "abc", via, settle=0.05).acquire()
        return
    with RunLock(bucket, "abc", via, settle=0.05):
        with pytest.raises(OutputBusy, match="another scoring job with this model is writing this output"):
            RunLock(bucket, "abc", via, settle=0.05).acquire()
