"""Local paths and s3:// URIs behind one small API, through fsspec/s3fs: the only module that holds a
filesystem handle.

S3 settings come from the config's ``s3`` section, else the standard AWS environment variables
(``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, ``AWS_REGION``/``AWS_DEFAULT_REGION``, and the usual
credential chain, which botocore reads itself). Secrets are passed to the client and nowhere else.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass, field

import fsspec


@dataclass
class S3Config:
    """How to reach s3:// URIs. Empty fields fall back to the standard AWS environment variables
    (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, ...) and profiles."""

    endpoint_url: str = ""
    region: str = ""
    access_key_id: str = field(default="", repr=False, metadata={"secret": True})
    secret_access_key: str = field(default="", repr=False, metadata={"secret": True})
    session_token: str = field(default="", repr=False, metadata={"secret": True})
    anon: bool = False


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


def absolute(uri: str) -> str:
    """An s3:// URI as it is; a local path made absolute (``~`` expanded)."""
    return uri if is_s3(uri) else os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))


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
    """The fsspec filesystem for ``uri`` and the path to use with it (for readers such as pyarrow
    that take a filesystem; steelray's own modules use the functions below)."""
    if is_s3(uri):
        return fsspec.filesystem("s3", **s3_options(s3, retries)), uri[len("s3://"):]
    return fsspec.filesystem("file"), absolute(uri)


def pyarrow_filesystem(uri: str, s3: S3Config | None = None):
    """(path, pyarrow filesystem or None): for S3 a bare ``bucket/prefix`` and pyarrow's S3 filesystem
    with the endpoint, keys and region (Ray Train's storage, ``list_files``); a local path and None otherwise."""
    if not is_s3(uri):
        return absolute(uri), None
    from pyarrow import fs as pafs

    opts = s3_options(s3)
    kwargs = {}
    if "endpoint_url" in opts:
        endpoint = opts["endpoint_url"]
        kwargs["endpoint_override"] = endpoint.split("://", 1)[-1]
        kwargs["scheme"] = endpoint.split("://", 1)[0] if "://" in endpoint else "https"
    if "client_kwargs" in opts:
        kwargs["region"] = opts["client_kwargs"]["region_name"]
    elif "endpoint_url" not in opts:  # AWS itself: the bucket's own region (s3fs follows redirects, pyarrow does not)
        try:
            kwargs["region"] = pafs.resolve_s3_region(uri[len("s3://"):].split("/", 1)[0])
        except OSError:
            pass  # pyarrow's default (us-east-1) then says what fails
    if "key" in opts:
        kwargs.update(access_key=opts["key"], secret_key=opts.get("secret"), session_token=opts.get("token"))
    if opts.get("anon"):
        kwargs["anonymous"] = True
    return uri[len("s3://"):], pafs.S3FileSystem(**kwargs)


def _uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return f"s3://{path}" if "s3" in fs.protocol else path


def read_bytes(uri: str, s3: S3Config | None = None, retries: int | None = None) -> bytes:
    fs, path = filesystem(uri, s3, retries)
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


def write_atomic(uri: str, data: bytes, s3: S3Config | None = None, retries: int | None = None) -> None:
    """Readers see the whole file or none of it: S3 objects appear whole on PUT; locally, write a
    hidden temporary file in the same folder, flush it to disk, and rename it into place."""
    fs, path = filesystem(uri, s3, retries)
    if is_s3(uri):
        fs.pipe_file(path, data)
        return
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_new(uri: str, data: bytes, s3: S3Config | None = None) -> None:
    """Create ``uri`` whole, only where nothing is: FileExistsError where something is. S3: a PUT
    with ``If-None-Match: *`` (a store that refuses conditional writes raises OSError); locally a
    hidden file linked into place."""
    fs, path = filesystem(uri, s3)
    if is_s3(uri):
        fs.pipe_file(path, data, mode="create")
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.new")
    with open(tmp, "wb") as f:
        f.write(data)
    try:
        os.link(tmp, path)  # appears whole, and only where there was none (FileExistsError)
    finally:
        os.remove(tmp)


def remove(uri: str, s3: S3Config | None = None) -> None:
    fs, path = filesystem(uri, s3)
    fs.rm(path)


def isdir(uri: str, s3: S3Config | None = None) -> bool:
    fs, path = filesystem(uri, s3)
    fs.invalidate_cache(path)
    return fs.isdir(path)


def isfile(uri: str, s3: S3Config | None = None) -> bool:
    fs, path = filesystem(uri, s3)
    fs.invalidate_cache(path)
    return fs.isfile(path)


def list_files(prefix: str, s3: S3Config | None = None, suffixes: tuple[str, ...] = (),
               recursive: bool = True) -> list[str]:
    """Sorted URIs of the files under a folder/prefix, optionally only those ending in ``suffixes``
    (case-insensitive). Listings are always fresh, never from a cache.

    A whole S3 prefix is listed through pyarrow's S3 filesystem, which keeps a path per key where
    s3fs keeps (and caches) a dict of every key's metadata: the scoring driver lists a whole night
    (docs/benchmarks.md, "A night at plant scale", compares the two)."""
    fs, path = filesystem(prefix, s3)
    fs.invalidate_cache(path)
    if not fs.isdir(path):
        raise FileNotFoundError(f"{prefix}: no such folder or prefix")
    if is_s3(prefix) and recursive:
        from pyarrow import fs as pafs

        base, pfs = pyarrow_filesystem(prefix, s3)
        infos = pfs.get_file_info(pafs.FileSelector(base.rstrip("/"), recursive=True))
        paths = [i.path for i in infos if i.type == pafs.FileType.File]
        del infos
    else:
        paths = fs.find(path, maxdepth=None if recursive else 1)
    suffixes = tuple(s.lower() for s in suffixes)
    # Keys ending in "/" are S3 "folder" markers (the console's "Create folder", many upload tools),
    # empty objects that s3fs lists as files: not inputs.
    return sorted(_uri(fs, p) for p in paths if not p.endswith("/") and (not suffixes or p.lower().endswith(suffixes)))


def list_names(folder: str, s3: S3Config | None = None) -> list[str]:
    """Names of the files and folders directly in ``folder`` (hidden ones too); [] where it is not."""
    fs, path = filesystem(folder, s3)
    fs.invalidate_cache(path)
    try:
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return []


def parquet_dataset(root: str, s3: S3Config | None = None, partitioning=None, files: list[str] | None = None):
    """A ``pyarrow.dataset`` of the Parquet files under ``root`` (or only ``files``, URIs under it),
    hidden files (``.``/``_``) skipped; None where there is no such file. A listing is read fresh:
    all of the filesystem's cache is dropped, as s3fs drops only a path and its parents and a file
    below may have been rewritten since (its cached ETag would then be refused on read). Given
    ``files`` (from such a listing), the cache is kept: it answers each file's size without a request."""
    import pyarrow as pa
    import pyarrow.dataset as pds

    fs, path = filesystem(root, s3)
    if files is not None:
        paths = [filesystem(f, s3)[1] for f in files]
        return pds.dataset(paths, filesystem=fs, format="parquet", partitioning=partitioning,
                           partition_base_dir=path.rstrip("/")) if paths else None
    fs.invalidate_cache()
    if not fs.isdir(path):
        return None
    try:
        dataset = pds.dataset(path, filesystem=fs, format="parquet", partitioning=partitioning)
        return dataset if dataset.files else None  # e.g. only a running job's _running/ lock so far
    except (FileNotFoundError, pa.ArrowInvalid) as e:
        if "no files" in str(e).lower():
            return None
        raise


def dataset_uri(root: str, path: str) -> str:
    """The URI of a file that a ``parquet_dataset`` of ``root`` lists by its filesystem path."""
    return f"s3://{path}" if is_s3(root) and not is_s3(path) else path
