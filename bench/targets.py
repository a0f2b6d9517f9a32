"""The four targets of bench/load.py, each with start() / send(body, timeout) -> Outcome / stop().

  inprocess       diffusers FluxPipeline.__call__ in this process, behind a lock (one at a time)
  naive           bench/naive_server.py in a subprocess, over HTTP
  ours-unbatched  the Serve app in this process's Ray cluster, every stage's max_batch_size=1
  ours            the Serve app as configured (replicas fixed at 1 unless autoscale)
"""

from __future__ import annotations

import copy
import gc
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
import yaml

from bench.loadgen import Outcome

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("text_encoder", "denoiser", "vae_decoder")
APP_NAME = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_send(url: str, body: dict, timeout: float) -> Outcome:
    """POST one generation; a 200's image count is the length of its `data`."""
    try:
        r = requests.post(f"{url}/v1/images/generations", json=body, timeout=(10, timeout))
    except requests.exceptions.RequestException as exc:
        return Outcome(0, error=f"{type(exc).__name__}")
    if r.status_code != 200:
        return Outcome(r.status_code, headers=dict(r.headers), error=f"HTTP {r.status_code}: {r.text[:200]}")
    return Outcome(200, images=len(r.json()["data"]), headers=dict(r.headers))


def wait_healthy(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll GET /health until it answers 200: a bounded loop, failing early if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before it was healthy")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except requests.exceptions.RequestException:
            pass
        time.sleep(0.2)  # poll interval
    raise TimeoutError(f"{url}/health did not answer 200 within {timeout:.0f} s")


# --- the config -------------------------------------------------------------------------------


def read_config(path: str | Path, model_path: str | None) -> tuple[dict, list[dict]]:
    """The first application's args (model.path overridden by `model_path`) and its deployments.
    API keys (`auth`) are dropped: the baselines have none, and the GPU configs read theirs from
    an environment variable that a benchmark host need not have."""
    app = yaml.safe_load(Path(path).read_text())["applications"][0]
    args = app["args"]
    args.pop("auth", None)
    if model_path:
        args["model"]["path"] = model_path
        args["model"]["name"] = "bench-model"
    return args, app.get("deployments", [])


def replica_env(path: str | Path) -> dict[str, str]:
    """The first application's `runtime_env` env_vars: Serve reads them when a replica process
    starts, so the harness's cluster gets them at `ray.init` (see serve_app/replica_env.py)."""
    app = yaml.safe_load(Path(path).read_text())["applications"][0]
    return dict((app.get("runtime_env") or {}).get("env_vars") or {})


def deployment_options(deployments: list[dict], autoscale: bool) -> dict:
    """Serve options per deployment: replicas fixed at 1, or the config's autoscaling kept."""
    options = {}
    for d in deployments:
        opts = {k: v for k, v in d.items() if k != "name"}
        if not autoscale or "autoscaling_config" not in opts:
            opts.pop("autoscaling_config", None)
            opts["num_replicas"] = 1
        options[d["name"]] = opts
    return options


def unbatched_args(args: dict) -> dict:
    """`args` with every stage's batching.max_batch_size=1 and limits.max_n=1."""
    args = copy.deepcopy(args)
    for stage in STAGES:
        args.setdefault(stage, {}).setdefault("batching", {})["max_batch_size"] = 1
    args.setdefault("limits", {})["max_n"] = 1
    return args


# --- targets ----------------------------------------------------------------------------------


class InProcessTarget:
    name = "inprocess"

    def __init__(self, model_path: str, dtype: str, device: str):
        self.model_path, self.dtype, self.device = model_path, dtype, device
        self.pipe = None
        self.lock = threading.Lock()

    def start(self) -> None:
        import torch
        from diffusers import FluxPipeline

        from deployments.families.base import torch_dtype

        self._torch = torch
        self.pipe = FluxPipeline.from_pretrained(self.model_path, dtype=torch_dtype(self.dtype)).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)

    def send(self, body: dict, timeout: float) -> Outcome:
        width, height = map(int, body.get("size", "1024x1024").split("x"))
        n = int(body.get("n", 1))
        gens = [self._torch.Generator("cpu").manual_seed(int(body.get("seed", 0)) + i) for i in range(n)]
        kwargs = {"guidance_scale": body["guidance_scale"]} if "guidance_scale" in body else {}
        if not self.lock.acquire(timeout=timeout):
            return Outcome(0, error="waited for the pipeline past the client timeout")
        try:
            images = self.pipe(
                body["prompt"], width=width, height=height, num_inference_steps=body.get("num_inference_steps", 28),
                num_images_per_prompt=n, generator=gens, **kwargs,
            ).images
            if self.device == "cuda":
                self._torch.cuda.synchronize()
        finally:
            self.lock.release()
        return Outcome(200, images=len(images))

    def stop(self) -> None:
        self.pipe = None
        gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()


class NaiveTarget:
    name = "naive"

    def __init__(self, model_path: str, dtype: str, log_path: Path, startup_timeout: float = 600):
        self.model_path, self.dtype, self.log_path = model_path, dtype, Path(log_path)
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, str(ROOT / "bench" / "naive_server.py"), "--model-path", self.model_path,
               "--dtype", self.dtype, "--port", str(port)]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            wait_healthy(self.url, self.startup_timeout, self.proc)
        except BaseException:
            self.stop()
            raise

    def send(self, body: dict, timeout: float) -> Outcome:
        return http_send(self.url, body, timeout)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self.proc = None


class RayCluster:
    """One local Ray cluster + Serve proxy for the `ours` targets, started on first use."""

    def __init__(self, device: str, env_vars: dict[str, str] | None = None, url: str = ""):
        """`url`: a cluster and proxy already running (its Serve HTTP address); none is started."""
        self.device = device
        self.env_vars = dict(env_vars or {})
        self.url = url
        self.owned = False  # shutdown() stops only a cluster that ensure() started

    def ensure(self) -> str:
        if not self.url:
            import ray
            from ray import serve

            cpus = {} if self.device == "cuda" else {"num_cpus": 2}
            # Replica logs go to Ray's log folder, not this terminal: the table stays readable.
            ray.init(
                address="local",
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": self.env_vars},
                **cpus,
            )
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            self.url, self.owned = f"http://127.0.0.1:{port}", True
        return self.url

    def shutdown(self) -> None:
        if self.owned:
            import ray
            from ray import serve

            try:
                serve.shutdown()
            finally:
                ray.shutdown()
                self.url, self.owned = "", False


class ServeTarget:
    """Our app, deployed into `cluster` on start() and deleted on stop(), called over HTTP."""

    def __init__(self, name: str, args: dict, options: dict, cluster: RayCluster, route_prefix: str = "/",
                 app_name: str = APP_NAME):
        self.name, self.cluster = name, cluster
        self.route_prefix, self.app_name = route_prefix, app_name
        self.args = copy.deepcopy(args)
        self.options = options
        self.url = ""
        self.store_dir: str | None = None

    def start(self) -> None:
        from ray import serve

        from serve_app.app import build_graph
        from serve_app.config import AppConfig

        # A job store of its own, removed on stop(): no records of another run are picked up.
        self.store_dir = tempfile.mkdtemp(prefix=f"dit-bench-{self.name}-")
        args = copy.deepcopy(self.args)
        args.setdefault("jobs", {}).setdefault("store", {})["path"] = str(Path(self.store_dir) / "jobs.sqlite3")
        self.url = self.cluster.ensure() + self.route_prefix.rstrip("/")
        serve.run(build_graph(AppConfig.model_validate(args), self.options), name=self.app_name,
                  route_prefix=self.route_prefix)

    def send(self, body: dict, timeout: float) -> Outcome:
        return http_send(self.url, body, timeout)

    def stop(self) -> None:
        from ray import serve

        if self.url:
            serve.delete(self.app_name)
            self.url = ""
        if self.store_dir:
            shutil.rmtree(self.store_dir, ignore_errors=True)
            self.store_dir = None


def make_target(name: str, *, args: dict, deployments: list[dict], device: str, cluster: RayCluster,
                out: Path, autoscale: bool):
    model_path, dtype = args["model"]["path"], args["model"].get("dtype", "float32")
    if name == "inprocess":
        return InProcessTarget(model_path, dtype, device)
    if name == "naive":
        return NaiveTarget(model_path, dtype, out / "naive_server.log")
    if name == "ours-unbatched":
        return ServeTarget(name, unbatched_args(args), deployment_options(deployments, False), cluster)
    if name == "ours":
        return ServeTarget(name, args, deployment_options(deployments, autoscale), cluster)
    raise ValueError(f"unknown target {name!r}; known: inprocess, naive, ours-unbatched, ours")
