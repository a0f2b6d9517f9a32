"""End-to-end: the app started from a file in configs/, as a user would, reached over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_copy(tmp_path: Path, name: str, port: int) -> Path:
    """configs/<name> unchanged but for the HTTP port (8000 may be taken on a test machine)."""
    document = yaml.safe_load((ROOT / "configs" / name).read_text())
    document["http_options"]["port"] = port
    path = tmp_path / name
    path.write_text(yaml.safe_dump(document))
    return path


def wait_healthy(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited early with {proc.returncode}")
        try:
            if requests.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise AssertionError(f"{url}/ready not 200 within {timeout_s}s")


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def default_sigint() -> None:
    """Popen's preexec_fn for a server the test will Ctrl-C: a shell starts background jobs with
    SIGINT ignored and children inherit that, so `make test &` would make the server deaf to
    Ctrl-C; a user's foreground terminal never does."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt(proc: subprocess.Popen, timeout_s: float = 90) -> int:
    """Ctrl-C, as a user in the foreground would; kill only if it does not stop."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
        raise AssertionError("did not stop within the timeout after Ctrl-C") from None


@pytest.fixture()
def user_env(tmp_path):
    """A fresh model cache (the builtin model is built on first use, by the replicas)."""
    env = dict(os.environ)
    env["DIT_SERVE_CACHE"] = str(tmp_path / "cache")
    env["DIT_SERVE_DATA"] = str(tmp_path / "data")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env
