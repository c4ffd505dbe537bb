"""cluster.yaml validates against the schema shipped inside the installed Ray package."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_validates_against_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    # what the project relies on, beyond the schema
    nodes = config["available_node_types"]
    assert config["head_node_type"] in nodes
    gpu = [n for n, v in nodes.items() if "max_workers" in v and n != config["head_node_type"]]
    assert gpu and all(nodes[n]["max_workers"] >= nodes[n].get("min_workers", 0) for n in gpu)
    setup = config["setup_commands"]
    torch_first = next(i for i, c in enumerate(setup) if "torch==" in c)
    project = next(i for i, c in enumerate(setup) if "-e ~/raybert" in c)
    assert torch_first < project, "torch must be installed before the project"
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head, "the dashboard must stay on the head's loopback"


def test_a_broken_cluster_yaml_is_rejected():
    import pytest

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["available_node_types"]["gpu_worker"]["max_workers"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, schema)
