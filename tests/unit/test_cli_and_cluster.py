from __future__ import annotations

import json
import os
from pathlib import Path

import jsonschema
import yaml

from serve_app.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_yaml_validates_against_rays_schema():
    import ray.autoscaler
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    validate_config(prepare_config(config))  # Ray's own check, after it fills its defaults
    gpu = [t for t in config["available_node_types"].values() if t["max_workers"] > 0]
    assert gpu, "a GPU worker type that the autoscaler may add"
    assert any("pip install" in c and "dit-serve" in c for c in config["setup_commands"])


def test_validate_config_command(tmp_path, capsys):
    assert main(["validate-config", str(ROOT / "configs" / "local.yaml")]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"applications": [{"name": "x", "args": {"limits": {"max_n": 100}}}]}))
    assert main(["validate-config", str(bad)]) == 1
    assert "max_n" in capsys.readouterr().err


def test_make_tiny_model_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "x").write_text("keep me")
    assert main(["make-tiny-model", "--family", "flux", "--out", str(tmp_path)]) == 2
    assert (tmp_path / "x").read_text() == "keep me"


def test_make_tiny_model_default_goes_where_builtin_resolves(private_cache, capsys):
    from deployments.tiny.store import resolve_model_path

    assert main(["make-tiny-model", "--family", "flux"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == resolve_model_path("builtin:tiny-flux")
    assert printed.startswith(os.environ["DIT_SERVE_CACHE"])
