"""One scoring job at a time per output root and model version.

Two jobs scoring the same inputs with the same model into the same output (a scheduler's retry
while the first attempt still runs on the cluster, a manual rerun beside the nightly one) would
each write every image: duplicate rows that a rerun cannot take back. A job therefore holds a small
JSON file, ``<output>/_running/<checkpoint digest>.json`` (readers skip ``_`` folders), created
exclusively (``O_EXCL`` locally; on S3 looked for first, then written with ``If-None-Match``, and
read back after a moment, which covers stores that ignore that header) and rewritten every
``beat`` seconds while the job runs. A job that finds it refuses to start, naming the holder,
unless the holder is gone: its process has died on this host, or it has not written for ``ttl``
seconds (a job killed on another node). Why our own: Ray has no lock service for jobs, and the output may be a plain
S3 prefix with nothing else beside it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from steelray import storage
from steelray.scoring.plan import ScoreError
from steelray.storage import S3Config

log = logging.getLogger(__name__)


class LockError(ScoreError):
    """The lock could not be taken."""


class OutputBusy(LockError):
    """Another job with the same model is writing this output."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class RunLock:
    """``with RunLock(output, digest, s3, ttl):`` holds the output for this model version."""

    def __init__(self, output: str, digest: str, s3: S3Config | None = None, ttl: float = 300.0,
                 beat: float = 30.0, settle: float = 0.5, what: str = ""):
        self.uri = storage.join(output, "_running", f"{digest}.json")
        self.s3, self.ttl, self.beat, self.settle = s3, ttl, min(beat, ttl / 4), settle
        self.token = uuid.uuid4().hex
        self.info = {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "what": what,
                     "started": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        try:
            return json.loads(storage.read_bytes(self.uri, self.s3))
        except FileNotFoundError:
            return None
        except ValueError:  # every write is whole (S3 PUT, link or rename): a damaged file
            return {}

    def _write(self, exclusive: bool) -> None:
        data = json.dumps({**self.info, "beat": time.time()}).encode()
        (storage.write_new if exclusive else storage.write_atomic)(self.uri, data, self.s3)

    def gone(self, held: dict) -> str:
        """Why the holder ``held`` no longer runs, or "" while it may."""
        if not held:
            return "the lock file is unreadable"
        quiet = time.time() - float(held.get("beat", 0))
        if quiet > self.ttl:
            return f"no sign of it for {quiet:.0f} s (score.lock_ttl={self.ttl:g})"
        if held.get("host") == self.info["host"] and not _alive(int(held.get("pid", -1))):
            return f"its process {held.get('pid')} has ended"
        return ""

    def acquire(self) -> None:
        try:
            # On S3, look first: a store that ignores If-None-Match (AWS S3 before 2024-08, some
            # S3-compatible ones) would let the write below replace a running job's lock.
            if storage.is_s3(self.uri) and self._read() is not None:
                raise FileExistsError(self.uri)
            self._write(exclusive=True)
            taken_over = None
        except FileExistsError:
            held = self._read()
            if held is None:  # released in between: try once more, from the start
                return self.acquire()
            why = self.gone(held)
            if not why:
                since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(held.get("started", 0))))
                raise OutputBusy(
                    f"{self.uri}: another scoring job with this model is writing this output (host "
                    f"{held.get('host')}, pid {held.get('pid')}, {held.get('what') or 'job'}, since {since}, last "
                    f"sign {time.time() - float(held.get('beat', 0)):.0f} s ago); two at once would score "
                    f"images twice. If that job is gone, wait {self.ttl:g} s after its last sign, or delete "
                    "the file") from None
            taken_over = (held, why)
            self._write(exclusive=False)
        except OSError as e:  # not "it exists": no write access, or an S3 store without conditional writes
            hint = (". Where the store takes no conditional writes (If-None-Match), set score.lock_ttl=0 and run "
                    "one job at a time") if storage.is_s3(self.uri) else ""
            raise LockError(f"{self.uri}: could not create the run lock: {type(e).__name__}: {e}{hint}") from e
        # A store that ignores If-None-Match, or two jobs taking over from the same dead one: after
        # a moment only one of them still finds its own token there.
        if storage.is_s3(self.uri) or taken_over:
            time.sleep(self.settle)
            if (self._read() or {}).get("token") != self.token:
                raise OutputBusy(f"{self.uri}: another scoring job with this model started at the same moment")
        if taken_over:
            held, why = taken_over
            log.warning("%s: taking over from the job on %s (pid %s): %s", self.uri, held.get("host"),
                        held.get("pid"), why)
        self._thread = threading.Thread(target=self._beat, name="steelray-runlock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.beat):
            try:
                held = self._read()
                if held is not None and held.get("token") != self.token:
                    log.error("%s: another job has taken this output over (host %s, pid %s): images may be "
                              "scored twice", self.uri, held.get("host"), held.get("pid"))
                    return
                self._write(exclusive=False)
            except Exception as e:  # noqa: BLE001 - a missed beat is retried; ttl allows several
                log.warning("%s: could not renew the lock: %s: %s", self.uri, type(e).__name__, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if (self._read() or {}).get("token") == self.token:
                storage.remove(self.uri, self.s3)
        except Exception as e:  # noqa: BLE001 - the next job sees it as gone (ended process, ttl)
            log.warning("%s: could not remove the lock: %s: %s", self.uri, type(e).__name__, e)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
