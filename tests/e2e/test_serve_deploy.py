"""`serve deploy configs/local.yaml` onto `ray start --head`, with Ray 2.60's token auth on.

The commands are the README's: generate a token once, start the head, deploy with the serve CLI in
token mode. HOME is a fresh folder, so the token is this test's own (as on a new machine).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time

import pytest
import requests

from tests.e2e.conftest import BIN, config_copy, free_port, wait_healthy


def run(args, env, timeout=240):
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture()
def ray_head(tmp_path, user_env):
    ports = {"gcs": free_port(), "dashboard": free_port()}
    home = tmp_path / "home"
    home.mkdir()
    env = dict(user_env, RAY_AUTH_MODE="token", HOME=str(home))
    token = run([str(BIN / "ray"), "get-auth-token", "--generate"], env)
    assert token.returncode == 0, token.stdout + token.stderr
    assert (home / ".ray" / "auth_token").is_file()
    # --block keeps `ray start` in the foreground as the parent of the processes it starts, so
    # this test stops its own cluster only (`ray stop` would stop every cluster on the machine);
    # its own --temp-dir keeps its address out of /tmp/ray, where a later `ray.init()` would look.
    temp_dir = tempfile.mkdtemp(prefix="ray-e2e-", dir="/tmp")  # short: socket paths are limited
    head = subprocess.Popen(
        [
            str(BIN / "ray"), "start", "--head", "--block",
            f"--port={ports['gcs']}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
            "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={temp_dir}",
        ],
        env=env,
        stdout=open(tmp_path / "ray-start.log", "w"),
        stderr=subprocess.STDOUT,
    )
    dashboard = f"http://127.0.0.1:{ports['dashboard']}"
    try:
        wait_for_dashboard(dashboard, head, timeout_s=120)
        yield env, dashboard
    finally:
        head.terminate()
        head.wait(timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for_dashboard(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "ray start exited"
        try:
            requests.get(url, timeout=5)
            return
        except requests.RequestException:
            time.sleep(1)
    raise AssertionError("the dashboard did not come up")


def test_serve_deploy_onto_a_running_cluster(tmp_path, ray_head):
    env, dashboard = ray_head
    port = free_port()
    config = config_copy(tmp_path, "local.yaml", port)
    deployed = run([str(BIN / "serve"), "deploy", str(config), "-a", dashboard], env)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, timeout_s=300)
    status = run([str(BIN / "serve"), "status", "-a", dashboard], env)
    assert "RUNNING" in status.stdout
    r = requests.post(f"{url}/v1/images/generations", json={"prompt": "a cat", "size": "64x64"}, timeout=120)
    assert r.status_code == 200, r.text
