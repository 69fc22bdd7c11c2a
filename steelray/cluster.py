"""What the connected Ray cluster means for a job's paths: on more than one node, a local path is a
folder on whichever node happens to read or write it, so every local input, output and storage path
must be on a filesystem every node mounts (declared in ``ray.shared_paths`` / ``score.shared_paths``)
or be an ``s3://`` URI. Checked before any work, so a job fails at once with the setting to change,
not after an hour with files scattered over nodes that a spot reclaim then takes away."""

from __future__ import annotations

import os

from steelray import storage
from steelray.config import ConfigError


def connect(address: str = "") -> bool:
    """Connect to the Ray cluster a job will run on; False (and nothing started) where there is
    none to connect to: the job then starts a local Ray of one node itself, where any path is fine."""
    import ray

    if ray.is_initialized():
        return True
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address in ("", "local"):  # "local": a new local Ray, which the job starts with what it needs
        return False
    ray.init(address=address)
    return True


def nodes() -> int:
    """Alive nodes of the connected cluster."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def check_shared(paths: list[tuple[str, str]], shared: list[str], address: str = "",
                 setting: str = "ray.shared_paths") -> None:
    """Raise ConfigError naming each setting of ``paths`` ((setting, path) pairs; a setting may
    come with many paths, e.g. a night's inputs) that has a local path outside every folder in
    ``shared``, when the connected cluster has more than one node."""
    if not connect(address):
        return
    alive = nodes()
    if alive < 2:
        return
    roots = [storage.absolute(s).rstrip(os.sep) + os.sep for s in shared]
    bad: dict[str, list[str]] = {}
    for name, path in paths:
        if path and not storage.is_s3(path):
            local = storage.absolute(path).rstrip(os.sep) + os.sep
            if not any(local.startswith(r) for r in roots):
                bad.setdefault(name, []).append(storage.absolute(path))
    if bad:
        listed = "; ".join(f"{name}={found[0]}" + (f" (and {len(found) - 1} more)" if len(found) > 1 else "")
                           for name, found in bad.items())
        raise ConfigError(f"{listed}: a local path on a Ray cluster of {alive} nodes, where each node has its "
                          "own disk: use an s3:// URI, or a folder every node mounts (NFS, EFS, FSx) declared "
                          f"with {setting}=[/mnt/shared]")
