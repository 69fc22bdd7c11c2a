"""The model registry (MLflow): checkpoints registered as versions of a named model, aliases
(``production``, ``candidate``) moved between versions, and ``models:/`` URIs resolved to checkpoints.

    python jobs/register.py --checkpoint s3://runs/neu/epoch-0042 --name neu-surface --alias candidate
    python jobs/register.py --name neu-surface --version 3 --alias production
    python jobs/score.py --checkpoint models:/neu-surface@production ...

Registering copies what scoring needs (``model.safetensors`` and ``meta.json``; an exported model's
``.onnx`` file), not the optimizer state, into the MLflow run that trained the checkpoint (or a run
of its own), and that copy is the version's source: the registry keeps what was registered when the
folder is later overwritten or deleted. The version's tags say where it came from
(``steelray.checkpoint``) and the SHA-256 of the registered files (``steelray.sha256``).

Resolving ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` gives the folder the version came
from while its files still have that digest (an S3 folder every node of a cluster reads), else the
registry's copy, downloaded once into ``tracking.cache``. The scoring output's ``checkpoint`` column
stays the weights' digest, so an alias moved to another version is a new model version there.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field

from steelray import ensemble, onnx_model, storage, tracking
from steelray.config_loader import setting
from steelray.storage import S3Config
from steelray.tracking import TrackingConfig

PREFIX = "models:/"
FOLDER_FILES = ("model.safetensors", "meta.json")
ALIAS = re.compile(r"^[A-Za-z0-9_-]{1,255}$")  # MLflow's alias rule (and not 'latest' or v<digits>)


class RegistryError(RuntimeError):
    """A registry request that cannot be done as asked (unknown model, alias or version; a folder
    that is not a checkpoint)."""


@dataclass
class RegisterConfig:
    """``jobs/register.py``: register a checkpoint as a new version, and/or move aliases."""

    checkpoint: str = ""           # checkpoint folder (local or s3://) or exported .onnx to register
    name: str = ""                 # registered model name, e.g. neu-surface
    version: int = setting(0, min=0)  # without checkpoint: the existing version the aliases move to
    aliases: list[str] = setting([])  # e.g. [candidate] or [production]: moved to this version
    description: str = ""


@dataclass
class RegisterJob:
    register: RegisterConfig = field(default_factory=RegisterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    s3: S3Config = field(default_factory=S3Config)


@dataclass
class Registered:
    name: str
    version: int
    source: str
    checkpoint: str
    sha256: str
    aliases: list[str]
    created: bool                  # False: this checkpoint was already that version


def is_model_uri(uri: str) -> bool:
    return uri.startswith(PREFIX)


def tracking_uri(cfg: TrackingConfig) -> str:
    """The MLflow server registered models are looked up on: ``tracking.uri`` or MLFLOW_TRACKING_URI."""
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise RegistryError("a models:/ checkpoint needs the MLflow server: set tracking.uri (or "
                            "MLFLOW_TRACKING_URI)")
    return uri


def files_of(uri: str) -> list[str]:
    """What a registered version holds: a checkpoint folder's weights and meta.json, or an .onnx file."""
    return [uri.rstrip("/").rsplit("/", 1)[-1]] if onnx_model.is_exported(uri) else list(FOLDER_FILES)


def digest(uri: str, s3: S3Config | None = None) -> str:
    """SHA-256 over the files a version holds, in order (raises FileNotFoundError)."""
    h = hashlib.sha256()
    if onnx_model.is_exported(uri):
        h.update(storage.read_bytes(uri, s3))
    else:
        for name in FOLDER_FILES:
            h.update(storage.read_bytes(storage.join(uri, name), s3))
    return h.hexdigest()


def register(job: RegisterJob) -> Registered:
    """Register ``register.checkpoint`` as a version of ``register.name`` (the same files twice are
    the same version), or take ``register.version``; then move ``register.aliases`` to it."""
    opts = job.register
    check(opts)
    client = tracking.client(tracking_uri(job.tracking), job.tracking.timeout)
    if not opts.checkpoint:
        mv = _version(client, opts.name, str(opts.version))
        created = False
    else:
        uri = storage.absolute(opts.checkpoint.rstrip("/"))
        if not onnx_model.is_exported(uri) and ensemble.is_ensemble(uri, job.s3):
            raise RegistryError(f"{uri}: an ensemble folder names its members by URI; register each member "
                                "(or export the ensemble's members) instead")
        try:
            sha = digest(uri, job.s3)
            meta = (json.loads(storage.read_text(storage.join(uri, "meta.json"), job.s3))
                    if not onnx_model.is_exported(uri) else {})
        except FileNotFoundError:
            raise RegistryError(f"{uri}: not a steelray checkpoint folder ({', '.join(FOLDER_FILES)}) "
                                "or exported .onnx file") from None
        if not _registered_model(client, opts.name):
            client.create_registered_model(opts.name, description=opts.description or None,
                                           tags={"steelray.task": meta.get("task", "")})
        same = [v for v in client.search_model_versions(f"name = '{opts.name}'")
                if v.tags.get("steelray.sha256") == sha]
        created = not same
        mv = same[0] if same else _create(client, job, uri, sha, meta)
    for alias in opts.aliases:
        client.set_registered_model_alias(opts.name, alias, mv.version)
    mv = client.get_model_version(opts.name, mv.version)
    return Registered(opts.name, int(mv.version), mv.source, mv.tags.get("steelray.checkpoint", ""),
                      mv.tags.get("steelray.sha256", ""), list(mv.aliases), created)


def check(opts: RegisterConfig) -> None:
    if not opts.name:
        raise RegistryError("register.name: required, the registered model's name (e.g. neu-surface)")
    if bool(opts.checkpoint) == bool(opts.version):
        raise RegistryError("give register.checkpoint (a new version) or register.version (an existing one "
                            "whose aliases to move), not both")
    if opts.version and not opts.aliases:
        raise RegistryError("register.version without register.aliases does nothing: name the aliases to move")
    for alias in opts.aliases:
        if not ALIAS.match(alias) or alias == "latest" or re.fullmatch(r"[vV]\d+", alias):
            raise RegistryError(f"register.aliases: {alias!r} is not an MLflow alias (letters, digits, _ and -; "
                                "not 'latest' or v<number>)")


def _create(client, job: RegisterJob, uri: str, sha: str, meta: dict):
    """A new version: the files copied into the training run (or a run of this registration)."""
    run = tracking.find(job.tracking, meta.get("mlflow_run_id", ""))
    own = not run.active
    if own:
        exp = client.get_experiment_by_name("steelray-registry")
        exp_id = exp.experiment_id if exp else client.create_experiment("steelray-registry")
        run_id = client.create_run(exp_id, run_name=f"register {job.register.name}",
                                   tags={"steelray.job": "register", "steelray.checkpoint": uri}).info.run_id
    else:
        run_id = run.run_id
    path = f"registered/{sha[:16]}"
    with tempfile.TemporaryDirectory() as tmp:
        for name in files_of(uri):
            src = uri if onnx_model.is_exported(uri) else storage.join(uri, name)
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(storage.read_bytes(src, job.s3))
        client.log_artifacts(run_id, tmp, path)
    if own:
        client.set_terminated(run_id)
    return client.create_model_version(job.register.name, f"runs:/{run_id}/{path}", run_id=run_id,
                                       tags={"steelray.checkpoint": uri, "steelray.sha256": sha},
                                       description=job.register.description or None)


def _registered_model(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in str(e.error_code):
            return None
        raise


def _version(client, name: str, ref: str):
    """A version by number or ``@alias``: RegistryError naming what exists where it does not."""
    from mlflow.exceptions import MlflowException

    try:
        if ref.startswith("@"):
            return client.get_model_version_by_alias(name, ref[1:])
        return client.get_model_version(name, ref)
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" not in str(e.error_code) and "INVALID_PARAMETER" not in str(e.error_code):
            raise
    model = _registered_model(client, name)
    if model is None:
        raise RegistryError(f"models:/{name}: no registered model of that name") from None
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    aliases = ", ".join(f"{a}: {v}" for a, v in sorted(model.aliases.items())) or "none"
    raise RegistryError(f"models:/{name}{'' if ref.startswith('@') else '/'}{ref}: not there (versions "
                        f"{versions or 'none'}; aliases {aliases})") from None


def resolve(uri: str, cfg: TrackingConfig, s3: S3Config | None = None) -> str:
    """``uri`` itself, or for ``models:/<name>@<alias>`` / ``models:/<name>/<version>`` the checkpoint
    folder (or .onnx) that version is. Raises RegistryError (no such model, version or alias) or
    tracking.TrackingUnavailable (the server cannot be reached: try later)."""
    if not is_model_uri(uri):
        return uri
    rest = uri[len(PREFIX):].strip("/")
    name, sep, ref = rest.partition("@")
    if not sep:
        name, _, ref = rest.rpartition("/")
    if not name or not ref:
        raise RegistryError(f"{uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
    client = tracking.client(tracking_uri(cfg), cfg.timeout)
    mv = _version(client, name, f"@{ref}" if sep else ref)
    origin, sha = mv.tags.get("steelray.checkpoint", ""), mv.tags.get("steelray.sha256", "")
    try:
        if origin and sha and digest(origin, s3) == sha:
            return origin
    except (FileNotFoundError, PermissionError, OSError):
        pass
    cache = os.path.join(os.path.expanduser(cfg.cache or "~/.cache/steelray/models"), name, str(mv.version))
    local = os.path.join(cache, files_of(origin)[0]) if onnx_model.is_exported(origin) else cache
    if not (os.path.exists(local) and sha and digest(local) == sha):
        import shutil

        import mlflow.artifacts

        os.makedirs(os.path.dirname(cache), exist_ok=True)
        with tempfile.TemporaryDirectory(dir=os.path.dirname(cache)) as tmp:
            got = mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=tmp,
                                                      tracking_uri=tracking.store_uri(tracking_uri(cfg)))
            shutil.rmtree(cache, ignore_errors=True)
            os.replace(got, cache)  # whole or not at all: a half download is never taken for the version
        if sha and digest(local) != sha:
            raise RegistryError(f"{uri}: the registry's copy of version {mv.version} does not have the digest "
                                "it was registered with")
    return local
