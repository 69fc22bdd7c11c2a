"""The install CI and the container image share (.ci/install): every pip setting with a uv
equivalent handed to uv, and a plant proxy's certificate really reaching it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pip_python() -> str:
    """A Python with pip outside the test's venv (as the one .ci/in-venv builds from)."""
    import os
    import shutil
    import subprocess

    venv = os.environ.get("VIRTUAL_ENV", "\0")
    path = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if not d.startswith(venv))
    for py in filter(None, [os.environ.get("PYTHON"), shutil.which("python3", path=path)]):
        if subprocess.run([py, "-m", "pip", "--version"], capture_output=True).returncode == 0:
            return py
    pytest.skip("no python3 with pip outside the test's venv: the mapping reads `pip config list`")


def uv_env(tmp_path, pip_conf: str, **env) -> dict[str, str]:
    """What .ci/install hands to uv for this pip.conf and environment (no PIP_*/UV_* variable of this
    machine's; its /etc/pip.conf is still read, as pip does, and each case sets what that file sets)."""
    import os
    import subprocess

    (tmp_path / "pip.conf").write_text(pip_conf)
    base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "XDG_CONFIG_DIRS": str(tmp_path / "none"),
            "PIP_CONFIG_FILE": str(tmp_path / "pip.conf"), "PYTHON": pip_python()}
    run = subprocess.run([str(REPO / ".ci" / "install"), "--uv-env"], env={**base, **env}, capture_output=True,
                         text=True, check=True)
    return dict(line.split("=", 1) for line in run.stdout.splitlines())


def test_every_pip_setting_with_a_uv_equivalent_reaches_uv(tmp_path):
    conf = """[global]
index-url = https://pypi.plant.example/simple
extra-index-url = https://a.example/simple https://b.example/simple
find-links = /opt/w1 /opt/w2
cert = /etc/plant/ca.pem
client-cert = /etc/plant/me.pem
proxy = http://proxy.plant:3128
timeout = 60
retries = 7
trusted-host = pypi.plant.example a.example
no-index = false
keyring-provider = subprocess
[install]
constraint = /etc/plant/constraints.txt
pre = true
timeout = 90
[download]
timeout = 5
"""
    assert uv_env(tmp_path, conf) == {
        "UV_DEFAULT_INDEX": "https://pypi.plant.example/simple",
        "UV_EXTRA_INDEX_URL": "https://a.example/simple https://b.example/simple",
        "UV_INDEX_STRATEGY": "unsafe-best-match", "UV_FIND_LINKS": "/opt/w1,/opt/w2",
        "UV_CONSTRAINT": "/etc/plant/constraints.txt", "UV_INSECURE_HOST": "pypi.plant.example a.example",
        "SSL_CERT_FILE": "/etc/plant/ca.pem", "SSL_CLIENT_CERT": "/etc/plant/me.pem",
        "HTTPS_PROXY": "http://proxy.plant:3128", "HTTP_PROXY": "http://proxy.plant:3128",
        "UV_HTTP_TIMEOUT": "90",  # [install] over [global], as pip install reads them; [download] not
        "UV_HTTP_RETRIES": "7", "UV_PRERELEASE": "allow", "UV_KEYRING_PROVIDER": "subprocess"}
    # PIP_* variables over the files (pip's order); a uv-side setting already made over both
    assert uv_env(tmp_path, "[global]\ncert = /g.pem\nno-index = true\n", PIP_CERT="/env.pem") == \
        {"SSL_CERT_FILE": "/env.pem", "UV_NO_INDEX": "1"}
    assert uv_env(tmp_path, "[global]\ncert = /g.pem\n", PIP_CERT="/env.pem", SSL_CERT_FILE="/mine.pem") == \
        {"SSL_CERT_FILE": "/mine.pem"}
    assert uv_env(tmp_path, "", PIP_CONFIG_FILE="/dev/null") == {}  # pip told to read no file: nothing


def test_a_proxys_certificate_in_pip_conf_lets_uv_install_from_an_https_index(tmp_path):
    """The plant's case: an index behind TLS signed by a private CA (a TLS-inspecting proxy's), named by
    pip.conf's `cert`, and no SSL_CERT_FILE. Without the mapping uv refuses the certificate; with what
    .ci/install hands it, it installs."""
    import base64
    import datetime as dt
    import hashlib
    import http.server
    import ipaddress
    import os
    import ssl
    import subprocess
    import sys
    import threading
    import zipfile

    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def cert(subject, key, issuer, issuer_key, ca):
        now = dt.datetime.now(dt.timezone.utc)
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
             .not_valid_after(now + dt.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
             .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                          data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                                          encipher_only=False, decipher_only=False), critical=True))
        if not ca:
            b = (b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                 critical=False)
                 .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
        return b.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("plant proxy CA", ca_key, "plant proxy CA", ca_key, True)
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "server.pem").write_bytes(
        cert("127.0.0.1", key, "plant proxy CA", ca_key, False).public_bytes(serialization.Encoding.PEM))
    (tmp_path / "server.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
    # a one-module wheel on a PEP 503 simple index
    www = tmp_path / "www"
    (www / "simple" / "plantpkg").mkdir(parents=True)
    files = {"plantpkg/__init__.py": b"VALUE = 42\n",
             "plantpkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: plantpkg\nVersion: 1.0\n",
             "plantpkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                             b"Tag: py3-none-any\n"}
    record = "".join(f"{n},sha256={base64.urlsafe_b64encode(hashlib.sha256(b).digest()).rstrip(b'=').decode()},"
                     f"{len(b)}\n" for n, b in files.items()) + "plantpkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(www / "simple" / "plantpkg" / "plantpkg-1.0-py3-none-any.whl", "w") as z:
        for name, body in {**files, "plantpkg-1.0.dist-info/RECORD": record.encode()}.items():
            z.writestr(name, body)
    (www / "simple" / "plantpkg" / "index.html").write_text(
        '<html><body><a href="plantpkg-1.0-py3-none-any.whl">plantpkg-1.0-py3-none-any.whl</a></body></html>')

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(www))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        index = f"https://127.0.0.1:{server.server_address[1]}/simple"
        handed = uv_env(tmp_path, f"[global]\nindex-url = {index}\ncert = {tmp_path / 'ca.pem'}\n")
        assert handed == {"UV_DEFAULT_INDEX": index, "SSL_CERT_FILE": str(tmp_path / "ca.pem")}
        uv = subprocess.run([str(REPO / ".ci" / "install"), "--uv"], capture_output=True, text=True).stdout.strip()
        if not uv:
            pytest.skip("uv could not be had here")
        base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "UV_NO_CONFIG": "1",
                "UV_CACHE_DIR": str(tmp_path / "uv-cache"), "UV_HTTP_TIMEOUT": "20"}
        subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(tmp_path / "v")], env=base, check=True)
        install = [uv, "pip", "install", "--python", str(tmp_path / "v" / "bin" / "python"), "plantpkg"]
        refused = subprocess.run(install, env={**base, "UV_DEFAULT_INDEX": index}, capture_output=True, text=True,
                                 timeout=120)
        assert refused.returncode != 0 and re.search(r"certificate|UnknownIssuer|tls", refused.stderr, re.I), \
            refused.stderr
        done = subprocess.run(install, env={**base, **handed}, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert subprocess.run([str(tmp_path / "v" / "bin" / "python"), "-c", "import plantpkg; print(plantpkg.VALUE)"],
                              capture_output=True, text=True).stdout.strip() == "42"
    finally:
        server.shutdown()
