"""Every shipped config runs its replicas with the Serve settings of serve_app/replica_env.py, and
the load harness hands a config's settings to its cluster."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from serve_app.replica_env import REPLICA_ENV

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_application_carries_the_replica_env(path):
    for app in yaml.safe_load(path.read_text())["applications"]:
        env = (app.get("runtime_env") or {}).get("env_vars") or {}
        assert {k: env.get(k) for k in REPLICA_ENV} == dict(REPLICA_ENV), app["name"]


def test_the_harness_reads_the_config_env(tmp_path):
    from bench.targets import replica_env

    assert replica_env(CONFIGS[0]) == dict(REPLICA_ENV)
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump({"applications": [{"name": "x", "import_path": "a:b"}]}))
    assert replica_env(bare) == {}
