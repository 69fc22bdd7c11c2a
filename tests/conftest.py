"""Shared fixtures: a real S3 (moto's server on 127.0.0.1), the real data sets when present, and
small synthetic data sets made once per session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
NEU_DIR = SHARED_DATA / "neu-det"
SEVERSTAL_DIR = SHARED_DATA / "severstal-sample"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """moto's S3 server on a free loopback port; the AWS env points every client at it."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto server did not start on {endpoint}; see {log.name}")
            time.sleep(0.2)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(10)
    log.close()


@pytest.fixture
def bucket(s3_endpoint, request):
    """A fresh, empty bucket per test: returns its s3:// URI."""
    import s3fs

    name = "t-" + "".join(c for c in request.node.name.lower() if c.isalnum())[:40] + f"-{time.monotonic_ns() % 10**6}"
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    fs.mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def neu_real() -> Path:
    if not NEU_DIR.is_dir():
        pytest.skip(f"real NEU data not present at {NEU_DIR} (only the team's machines have ../shared/data)")
    return NEU_DIR


@pytest.fixture(scope="session")
def severstal_real() -> Path:
    if not SEVERSTAL_DIR.is_dir():
        pytest.skip(f"real Severstal sample not present at {SEVERSTAL_DIR} "
                    "(only the team's machines have ../shared/data)")
    return SEVERSTAL_DIR


@pytest.fixture(scope="session")
def sheets(tmp_path_factory):
    """24 synthetic Severstal sheets with every class present (seed 7), written once."""
    from steelray import synth

    out = tmp_path_factory.mktemp("sheets")
    written = synth.make_severstal(str(out), 24, seed=7, defect_free_share=0.25,
                                   class_freq=(0.25, 0.25, 0.3, 0.2), workers=1)
    return written


@pytest.fixture(scope="session")
def load_job():
    """An entry script under jobs/ as a module, to call its ``main(argv)`` in the test's process (a
    subprocess imports torch and the rest again)."""
    import importlib.util

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One local Ray (2 CPUs) for the whole session, in its own temp dir so no stale cluster is joined."""
    import ray

    ray.init(num_cpus=2, resources={"trial_driver": 4},  # Tune trial drivers run on this, not on CPUs
             _temp_dir=str(tmp_path_factory.mktemp("ray")), include_dashboard=None,
             # not Ray's default port: the clusters test_multinode starts while this one is up want it
             dashboard_port=_free_port(),
             # Ray Train's controller polls its workers every 2 s by default: a tiny test run waits
             # up to that long after its last epoch
             runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}})
    yield ray
    ray.shutdown()


# The MLflow server the tests start: the full mlflow package, in an environment of its own (it pins
# pyarrow < 26, which steelray cannot take; jobs need only mlflow-skinny, in the test venv). boto3:
# the S3 variant stores artifacts on moto.
MLFLOW_SERVER = ("mlflow>=3.17.2,<4", "boto3")


@pytest.fixture(scope="session")
def mlflow_env() -> Path:
    """The server's Python environment, built once with uv (as .ci/install hands it pip's settings)
    next to the test venvs, and kept."""
    import hashlib
    import shutil

    root = Path(os.environ.get("STEELRAY_VENV_ROOT") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                / "steelray")
    env_dir = root / ("mlflow-server-" + hashlib.sha256(" ".join(MLFLOW_SERVER).encode()).hexdigest()[:12])
    if (env_dir / "bin" / "python").exists():
        return env_dir
    env = {**os.environ, "PYTHON": sys.executable, "STEELRAY_VENV_ROOT": str(root)}
    uv = subprocess.run([str(REPO / ".ci" / "install"), "--uv"], env=env, capture_output=True, text=True)
    settings = subprocess.run([str(REPO / ".ci" / "install"), "--uv-env"], env=env, capture_output=True, text=True)
    if uv.returncode or settings.returncode:
        pytest.fail(f"cannot build the MLflow server's environment: no uv ({uv.stderr.strip()[-500:]})")
    env.update(line.split("=", 1) for line in settings.stdout.splitlines() if "=" in line)
    tmp = root / f"{env_dir.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    steps = [[uv.stdout.strip(), "venv", "--quiet", "--python", sys.executable, str(tmp)],
             [uv.stdout.strip(), "pip", "install", "--quiet", "--python", str(tmp / "bin" / "python"), *MLFLOW_SERVER]]
    for step in steps:
        done = subprocess.run(step, env=env, capture_output=True, text=True)
        if done.returncode:
            shutil.rmtree(tmp, ignore_errors=True)
            pytest.fail(f"cannot build the MLflow server's environment: {' '.join(step)}: {done.stderr[-1500:]}")
    os.replace(tmp, env_dir)  # whole or not at all
    return env_dir


def start_mlflow(env_dir: Path, folder: Path, artifacts: str, env: dict | None = None):
    """``mlflow server`` on a free loopback port (SQLite store in ``folder``, artifacts served from
    ``artifacts``); returns (process, URL) once it answers /health."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(folder / "mlflow.log", "w")
    # python -m: the environment was built elsewhere and moved, so its scripts' #! lines are stale
    proc = subprocess.Popen([str(env_dir / "bin" / "python"), "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
                             "--artifacts-destination", artifacts],
                            stdout=log, stderr=subprocess.STDOUT, cwd=folder, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"mlflow server did not start on {url}; see {log.name}")
            time.sleep(0.3)


@pytest.fixture(scope="session")
def mlflow_server(mlflow_env, tmp_path_factory):
    """An MLflow tracking server and registry on 127.0.0.1, artifacts in a local folder: its URL."""
    folder = tmp_path_factory.mktemp("mlflow")
    proc, url = start_mlflow(mlflow_env, folder, str(folder / "artifacts"))
    yield url
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="session")
def mlflow_server_s3(mlflow_env, s3_endpoint, tmp_path_factory):
    """The same with its artifacts on moto's S3 (served through the server, as a plant sets it up,
    so clients need no S3 credentials for them): its URL."""
    import s3fs

    s3fs.S3FileSystem(endpoint_url=s3_endpoint).mkdir("mlflow-artifacts")
    folder = tmp_path_factory.mktemp("mlflow-s3")
    proc, url = start_mlflow(mlflow_env, folder, "s3://mlflow-artifacts/store",
                             {"MLFLOW_S3_ENDPOINT_URL": s3_endpoint})
    yield url
    proc.terminate()
    proc.wait(30)


class FlakyS3:
    """An HTTP proxy in front of moto that answers 503 (ServiceUnavailable) to the first ``fail[key]``
    requests naming an object key, then passes them on: real transient S3 failures for real clients,
    nothing patched. ``seen[key]`` counts every request that named the key. ``conditional`` plays
    an S3-compatible store without conditional writes: "ignore" drops a PUT's ``If-None-Match``
    (as AWS S3 did before 2024-08), "refuse" answers it 501 NotImplemented."""

    def __init__(self, upstream: str):
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import unquote, urlsplit

        self.fail: dict[str, int] = {}
        self.seen: dict[str, int] = {}
        self.conditional = "pass"
        lock = threading.Lock()
        host, port = urlsplit(upstream).hostname, urlsplit(upstream).port
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        chunk = self.rfile.read(size + 2)[:size]
                        if not size:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += chunk
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                key = unquote(urlsplit(self.path).path).split("/", 2)[-1]
                with lock:
                    proxy.seen[key] = proxy.seen.get(key, 0) + 1
                    failing = proxy.fail.get(key, 0) > 0
                    if failing:
                        proxy.fail[key] -= 1
                conditional = self.command == "PUT" and "If-None-Match" in self.headers
                if conditional and proxy.conditional == "refuse":
                    code, status = b"NotImplemented", 501
                elif failing:
                    code, status = b"ServiceUnavailable", 503
                if failing or (conditional and proxy.conditional == "refuse"):
                    err = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>' + code + b"</Code>"
                           b"<Message>injected by the test proxy</Message></Error>")
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(err)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(err)
                    return
                dropped = {"transfer-encoding"} | ({"if-none-match"} if proxy.conditional == "ignore" else set())
                headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(host, port, timeout=60)
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky_s3(s3_endpoint):
    proxy = FlakyS3(s3_endpoint)
    yield proxy
    proxy.close()


@pytest.fixture(scope="session")
def spark():
    """A local Spark session (one core, bound to 127.0.0.1, no web UI), for reading the outputs."""
    import shutil

    try:
        from pyspark.sql import SparkSession
    except ImportError:
        pytest.skip("pyspark is not installed (it comes with the test extra: pip install -e '.[test]')")
    if not (shutil.which("java") or os.environ.get("JAVA_HOME")):
        pytest.skip("Spark needs a Java runtime (17 or later): no java on PATH and no JAVA_HOME")
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    session = (SparkSession.builder.master("local[1]").appName("steelray-tests")
               .config("spark.driver.bindAddress", "127.0.0.1").config("spark.driver.host", "127.0.0.1")
               .config("spark.ui.enabled", "false").config("spark.sql.session.timeZone", "UTC")
               # a short-lived JVM: the quick JIT tier alone starts it faster
               .config("spark.driver.extraJavaOptions", "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC")
               .getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()
