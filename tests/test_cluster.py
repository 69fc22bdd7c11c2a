"""cluster.yaml against Ray's own cluster-config schema (no cloud calls)."""

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config


@pytest.fixture
def cluster():
    with open("cluster.yaml") as f:
        return yaml.safe_load(f)


def test_cluster_yaml_passes_rays_schema(cluster):
    validate_config(prepare_config(cluster))  # what `ray up` does before launching anything
    types = cluster["available_node_types"]
    assert cluster["provider"]["type"] == "aws"
    assert "GPU" not in types[cluster["head_node_type"]].get("resources", {})
    assert types["gpu_worker"]["min_workers"] == 0 and types["gpu_worker"]["max_workers"] > 0


def test_dashboard_stays_off_public_interfaces_and_auth_stays_on(cluster):
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    text = open("cluster.yaml").read()
    assert "RAY_AUTH_MODE=disabled" not in text and "0.0.0.0/0" not in text.replace("never 0.0.0.0/0", "")
    ssh = cluster["provider"]["security_group"]["IpPermissions"]
    assert [p["FromPort"] for p in ssh] == [22]


def test_schema_check_is_real(cluster):
    cluster["available_node_types"]["gpu_worker"]["min_wokers"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(cluster))  # what `ray up` does before launching anything
