"""Local paths and s3:// URIs behind one small API, through fsspec/s3fs.

S3 settings come from the config's ``s3`` section, else the standard AWS environment variables
(``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, ``AWS_REGION``/``AWS_DEFAULT_REGION``, and the usual
credential chain, which botocore reads itself). Secrets are passed to the client and nowhere else.
"""

from __future__ import annotations

import os
import posixpath
from typing import TYPE_CHECKING

import fsspec

if TYPE_CHECKING:
    from steelray.config import S3Config


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join path parts under a local folder or an s3:// prefix; absolute parts and URIs win."""
    out = base
    for part in parts:
        if not part:
            continue
        if is_s3(part) or part.startswith("/") or "://" in part:
            out = part
        elif is_s3(out):
            out = posixpath.join(out, part)
        else:
            out = os.path.join(out, part)
    return out


def s3_options(s3: S3Config | None = None, retries: int | None = None) -> dict:
    """Keyword arguments for ``s3fs.S3FileSystem`` from the config, then the environment.

    ``retries``: attempts beyond the first for throttling, 5xx and connection errors, with botocore's
    exponential backoff and jitter ("standard" mode); None keeps the defaults."""
    env = os.environ
    endpoint = (s3.endpoint_url if s3 else "") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    region = (s3.region if s3 else "") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    opts: dict = {}
    if endpoint:
        opts["endpoint_url"] = endpoint
    if region:
        opts["client_kwargs"] = {"region_name": region}
    if s3 is not None:
        if s3.access_key_id:
            opts["key"] = s3.access_key_id
        if s3.secret_access_key:
            opts["secret"] = s3.secret_access_key
        if s3.session_token:
            opts["token"] = s3.session_token
        if s3.anon:
            opts["anon"] = True
    if retries is not None:
        # botocore: total_max_attempts counts the first try (its max_attempts would not)
        opts["config_kwargs"] = {"retries": {"total_max_attempts": retries + 1, "mode": "standard"}}
    return opts


def filesystem(uri: str, s3: S3Config | None = None,
               retries: int | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path to use with it."""
    if is_s3(uri):
        return fsspec.filesystem("s3", **s3_options(s3, retries)), uri[len("s3://"):]
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(uri))


def _uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return f"s3://{path}" if "s3" in fs.protocol else path


def read_bytes(uri: str, s3: S3Config | None = None) -> bytes:
    fs, path = filesystem(uri, s3)
    with fs.open(path, "rb") as f:
        return f.read()


def read_text(uri: str, s3: S3Config | None = None) -> str:
    return read_bytes(uri, s3).decode("utf-8-sig")  # tolerate a BOM from spreadsheet exports


def write_bytes(uri: str, data: bytes, s3: S3Config | None = None) -> None:
    fs, path = filesystem(uri, s3)
    if not is_s3(uri):
        fs.makedirs(os.path.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def write_text(uri: str, text: str, s3: S3Config | None = None) -> None:
    write_bytes(uri, text.encode("utf-8"), s3)


def isdir(uri: str, s3: S3Config | None = None) -> bool:
    fs, path = filesystem(uri, s3)
    fs.invalidate_cache(path)
    return fs.isdir(path)


def list_files(prefix: str, s3: S3Config | None = None, suffixes: tuple[str, ...] = (),
               recursive: bool = True) -> list[str]:
    """Sorted URIs of the files under a folder/prefix, optionally only those ending in ``suffixes``
    (case-insensitive). Listings are always fresh, never from a cache."""
    fs, path = filesystem(prefix, s3)
    fs.invalidate_cache(path)
    if not fs.isdir(path):
        raise FileNotFoundError(f"{prefix}: no such folder or prefix")
    paths = fs.find(path, maxdepth=None if recursive else 1)
    suffixes = tuple(s.lower() for s in suffixes)
    # Keys ending in "/" are S3 "folder" markers (the console's "Create folder", many upload tools),
    # empty objects that s3fs lists as files: not inputs.
    return sorted(_uri(fs, p) for p in paths if not p.endswith("/") and (not suffixes or p.lower().endswith(suffixes)))
