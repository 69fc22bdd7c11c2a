"""The Ray cluster a job runs on: its nodes, what its autoscaler can add (``capacity``), whether a
set of resources fits (``fits``), and what that means for a job's paths.

On more than one node (or where the autoscaler can add one), a local path is a folder on whichever
node happens to read or write it, so every local input, output and storage path must be on a
filesystem every node mounts (declared in ``ray.shared_paths`` / ``score.shared_paths``) or be an
``s3://`` URI. Checked before any work (``check_shared``), so a job fails at once with the setting to
change, not after an hour with files scattered over nodes that a spot reclaim then takes away."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

from steelray import storage
from steelray.config import ConfigError

log = logging.getLogger(__name__)


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


def check_shared(paths: list[tuple[str, str]], shared: list[str], address: str = "",
                 setting: str = "ray.shared_paths") -> None:
    """Raise ConfigError naming each setting of ``paths`` ((setting, path) pairs; a setting may
    come with many paths, e.g. a night's inputs) that has a local path outside every folder in
    ``shared``, when the connected cluster has more than one node or its autoscaler can add one."""
    if not connect(address):
        return
    cap = capacity()
    alive = len(cap.nodes)
    can_add = growth(cap.types) if alive < 2 else ""
    if alive < 2 and not can_add:
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
        where = (f"a Ray cluster of {alive} nodes" if alive > 1
                 else f"a Ray cluster whose autoscaler can add nodes ({can_add})")
        raise ConfigError(f"{listed}: a local path on {where}, where each node has its own disk: use an s3:// "
                          f"URI, or a folder every node mounts (NFS, EFS, FSx) declared with {setting}=[/mnt/shared]")


@dataclass(frozen=True)
class Capacity:
    """What a job can place on the connected cluster: each alive node's resources now, and the node
    types its autoscaler can start (empty: no autoscaler, or none that says what it can start)."""

    nodes: tuple[dict[str, float], ...]
    types: tuple[tuple[dict[str, float], float], ...] = ()  # (resources of one node, most of them; inf: no limit)

    def now(self, resource: str) -> float:
        return sum(n.get(resource, 0.0) for n in self.nodes)

    def most(self, resource: str) -> float:
        """``resource`` on the cluster at its largest: the nodes up now, and every node the autoscaler
        may still start (those up count against their type's limit, roughly: by shape)."""
        extra = 0.0
        for shape, count in self.types:
            up = sum(1 for n in self.nodes if _same_shape(n, shape))
            extra += max(0.0, count - up) * shape.get(resource, 0.0) if shape.get(resource, 0.0) else 0.0
        return self.now(resource) + extra


def _same_shape(node: dict[str, float], shape: dict[str, float]) -> bool:
    return all(abs(node.get(k, 0.0) - v) < 1e-6 for k, v in shape.items() if k in ("CPU", "GPU"))


def capacity() -> Capacity:
    """The connected cluster's Capacity. What its autoscaler can start is read from the cluster
    config the autoscaler publishes in the GCS (autoscaler v2, KubeRay's; no public API says it:
    ``ray._private.state``, which Ray Data's own autoscaling reads too), else from the cluster
    launcher's ``~/ray_bootstrap_config.yaml`` on the head (autoscaler v1; node types there count
    when they declare their ``resources``, as ``cluster.yaml`` does). Neither: the nodes up now."""
    import ray

    nodes = tuple({k: float(v) for k, v in n["Resources"].items() if not k.startswith("node:")}
                  for n in ray.nodes() if n.get("Alive"))
    types: list[tuple[dict[str, float], float]] = []
    try:
        config = ray._private.state.state.get_cluster_config()
        for group in (config.node_group_configs if config else []):
            if group.max_count != 0 and group.resources and group.max_count != group.min_count:
                types.append(({k: float(v) for k, v in group.resources.items()},
                              math.inf if group.max_count < 0 else float(group.max_count)))
    except Exception as e:  # noqa: BLE001 - a private API: without it, the launcher's file or the nodes up
        log.info("could not read the autoscaler's cluster config (%s: %s)", type(e).__name__, e)
    if not types:
        types = launcher_types(os.path.expanduser(LAUNCHER_CONFIG))
    return Capacity(nodes, tuple(types))


LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` puts the cluster config on the head


def launcher_types(path: str) -> list[tuple[dict[str, float], float]]:
    """The node types a cluster launcher config (``cluster.yaml`` as ``ray up`` copies it to the head)
    lets the autoscaler start: (resources, max_workers) of each type that declares its resources."""
    import yaml

    if not os.path.isfile(path):
        return []
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    out = []
    for name, spec in (config.get("available_node_types") or {}).items():
        most = float(spec.get("max_workers", config.get("max_workers", 0)) or 0)
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        if name != config.get("head_node_type") and most and ("CPU" in resources or "GPU" in resources):
            out.append((resources, most))
    return out


def fits(nodes: list[dict[str, float]], shapes: list[dict[str, float]]) -> bool:
    """Whether every shape of ``shapes`` (resource dicts) can be placed at once, each whole on one
    node of ``nodes``: first fit, largest shapes first (enough for the few shapes a job asks)."""
    free = [dict(n) for n in nodes]
    for shape in sorted(shapes, key=lambda s: (-s.get("GPU", 0.0), -s.get("CPU", 0.0))):
        node = next((f for f in free if all(f.get(k, 0.0) + 1e-9 >= v for k, v in shape.items() if v)), None)
        if node is None:
            return False
        for k, v in shape.items():
            node[k] = node.get(k, 0.0) - v
    return True


def describe(nodes) -> str:
    """``2 x {CPU 1}, 1 x {CPU 2, GPU 1}``: the nodes by shape."""
    counts: dict[str, int] = {}
    for n in nodes:
        key = shape_text(n)
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{c} x {k}" for k, c in counts.items()) or "no nodes"


def growth(types) -> str:
    """``up to 8 x {CPU 8, GPU 1}``: the nodes an autoscaler can start."""
    return ", ".join(f"up to {'any number' if math.isinf(most) else f'{most:g}'} x {shape_text(shape)}"
                     for shape, most in types)


def shape_text(shape: dict[str, float]) -> str:
    parts = [f"{k} {v:g}" for k, v in sorted(shape.items()) if k in ("CPU", "GPU") and v]
    if shape.get("memory"):
        parts.append(f"memory {shape['memory'] / 2**30:.1f} GiB")
    return "{" + ", ".join(parts or ["nothing"]) + "}"
