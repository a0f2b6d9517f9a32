"""A throwaway `redis-server` for tests: on 127.0.0.1, a free port, no persistence."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from typing import Optional

INSTALL_HINT = (
    "the Redis job store tests need a `redis-server` binary on PATH; install it with "
    "`apt-get install redis-server` (Debian/Ubuntu), `brew install redis` (macOS) or from "
    "https://redis.io/docs/latest/operate/oss_and_stack/install/"
)


def find_redis_server(install: bool = True) -> Optional[str]:
    """`redis-server`'s path. Missing, and running as root where apt-get exists, it installs
    the Debian package first (refreshing the package lists only if the install fails)."""
    path = shutil.which("redis-server")
    if path or not install:
        return path
    apt = shutil.which("apt-get")
    if apt is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = [apt, "install", "-y", "--no-install-recommends", "redis-server"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
    if subprocess.run(command, **quiet).returncode != 0:
        subprocess.run([apt, "update"], **quiet)
        subprocess.run(command, **quiet)
    return shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """`start()` runs a server in `workdir` and waits until it answers PING; `stop()` ends it."""

    def __init__(self, binary: str, workdir: str):
        self.binary = binary
        self.workdir = workdir
        self.port: Optional[int] = None
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 15.0, tries: int = 3) -> "RedisServer":
        error = "did not start"
        for _ in range(tries):  # another process may take the free port before the server does
            self.port = _free_port()
            log = open(os.path.join(self.workdir, f"redis-{self.port}.log"), "wb")
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "--port", str(self.port),
                    "--bind", "127.0.0.1",
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", self.workdir,
                    "--daemonize", "no",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            log.close()
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    error = f"exited with status {self.process.returncode}"
                    break
                if _ping(self.port):
                    return self
                time.sleep(0.05)
            else:
                error = f"did not answer PING within {timeout_s} s"
            self.stop()
        with open(os.path.join(self.workdir, f"redis-{self.port}.log"), errors="replace") as f:
            raise RuntimeError(f"redis-server {error}:\n{f.read()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
