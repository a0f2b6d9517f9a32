"""`serve run --address local configs/local.yaml` (what `make serve` runs) and its SP=2 twin
`configs/local-sp2.yaml` (two denoiser workers over gloo): a PNG back over HTTP, then a clean
Ctrl-C. `--address local` starts a cluster of its own even if another one (or a stale record of one
in /tmp/ray) exists on the machine."""

from __future__ import annotations

import base64
import io
import subprocess
from pathlib import Path

import pytest
import requests
from PIL import Image

from tests.e2e.conftest import BIN, config_copy, default_sigint, free_port, interrupt, port_is_free, wait_healthy


def denoise_workers(root: int) -> list[int]:
    """pids of the denoiser worker actors (Ray names their processes) that `root` started: other
    Ray clusters on the machine are not this server's."""
    parents, names = {}, {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit():
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
                names[int(entry.name)] = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue

    def under_root(pid: int) -> bool:
        for _ in range(64):
            if pid == root:
                return True
            pid = parents.get(pid, 0)
            if pid <= 1:
                return False
        return False

    return [pid for pid, cmd in names.items() if cmd.startswith(b"ray::DenoiseWorker") and under_root(pid)]


@pytest.mark.parametrize("name", ["local.yaml", "local-sp2.yaml"])
def test_serve_run_local_config(tmp_path, user_env, name):
    port = free_port()
    config = config_copy(tmp_path, name, port)
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "serve"), "run", "--address", "local", str(config)],
        cwd=tmp_path,  # not the checkout: the installed package is what serves
        env=user_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=default_sigint,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout_s=300, proc=proc)
        # the README's curl call
        r = requests.post(
            f"{url}/v1/images/generations",
            json={"prompt": "a lighthouse at dawn", "size": "192x128", "seed": 7},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        png = base64.b64decode(r.json()["data"][0]["b64_json"])
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(io.BytesIO(png)) as im:
            assert im.format == "PNG" and im.size == (192, 128)
        # the README's openai client call
        from openai import OpenAI

        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        result = client.images.generate(model="tiny-flux", prompt="a red fox", size="64x64", n=2)
        assert len(result.data) == 2 and all(d.b64_json for d in result.data)
        assert requests.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"] == "tiny-flux"
        # one denoiser replica: as many worker processes as its SP degree
        assert len(denoise_workers(proc.pid)) == (2 if name == "local-sp2.yaml" else 1)
    finally:
        code = interrupt(proc)
        log.close()
    output = (tmp_path / "serve.log").read_text(errors="replace")
    assert port_is_free(port), "the proxy is still listening after Ctrl-C"
    assert code in (0, 1, 130), output[-3000:]  # click exits 1 ("Aborted!") on Ctrl-C
    assert "Already borrowed" not in output
