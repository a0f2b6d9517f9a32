"""Load generation for bench/load.py: the workload draw, closed- and open-loop drivers, statistics.

A target is anything with `send(body: dict, timeout: float) -> Outcome`; the drivers time the calls
themselves, so in-process and HTTP targets are measured the same way. Everything is bounded: a
fixed number of requests, a deadline per load point, and a client timeout per request.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from bench.bench_service import PROMPTS  # the same fixed prompts

REQUEST_FIELDS = ("size", "n", "num_inference_steps", "guidance_scale")
MAX_OPEN_LOOP_THREADS = 256


@dataclass
class Outcome:
    """What a target answered: HTTP status (0: no answer), images returned, response headers."""

    status: int
    images: int = 0
    headers: dict = field(default_factory=dict)
    error: str | None = None


@dataclass
class Record:
    """One measured request. Times are time.perf_counter() values; `scheduled` is when it was due
    (open loop: its arrival time; closed loop: when its client thread picked it up)."""

    index: int
    scheduled: float
    start: float
    end: float
    outcome: Outcome

    @property
    def latency(self) -> float:
        return self.end - self.scheduled


Send = Callable[[dict, float], Outcome]


# --- workload ---------------------------------------------------------------------------------


def load_workload(path: str | Path) -> list[dict]:
    templates = json.loads(Path(path).read_text())
    if not isinstance(templates, list) or not templates:
        raise ValueError(f"{path}: a workload is a non-empty JSON list of request templates")
    for t in templates:
        if float(t.get("weight", 1.0)) <= 0:
            raise ValueError(f"{path}: weights must be positive: {t}")
    return templates


def draw_requests(templates: list[dict], count: int, seed: int) -> list[dict]:
    """`count` request bodies drawn by weight from `templates`, the same for the same seed."""
    rng = random.Random(seed)
    weights = [float(t.get("weight", 1.0)) for t in templates]
    bodies = []
    for i in range(count):
        template = rng.choices(templates, weights=weights)[0]
        body = {k: v for k, v in template.items() if k != "weight"}
        body.setdefault("n", 1)
        body["prompt"] = PROMPTS[rng.randrange(len(PROMPTS))]
        body["seed"] = seed * 100_000 + i
        bodies.append(body)
    return bodies


def poisson_schedule(rate: float, count: int, seed: int) -> list[float]:
    """Arrival offsets (s from the start) of `count` Poisson arrivals at `rate` per second."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    rng = random.Random(f"arrivals:{seed}:{rate!r}")
    t, offsets = 0.0, []
    for _ in range(count):
        t += rng.expovariate(rate)
        offsets.append(t)
    return offsets


# --- drivers ----------------------------------------------------------------------------------


def _timed(send: Send, index: int, body: dict, scheduled: float, timeout: float) -> Record:
    start = time.perf_counter()
    try:
        outcome = send(body, timeout)
    except Exception as exc:  # a target's failure is a measured failure, not a crash of the run
        outcome = Outcome(0, error=f"{type(exc).__name__}: {exc}")
    return Record(index, scheduled, start, time.perf_counter(), outcome)


def closed_loop(send: Send, bodies: list[dict], concurrency: int, max_seconds: float, timeout: float):
    """`concurrency` clients, each sending back to back, until every body is sent or `max_seconds`
    pass. Returns (records, wall seconds)."""
    lock = threading.Lock()
    next_index = [0]
    records: list[Record] = []
    begin = time.perf_counter()
    deadline = begin + max_seconds

    def client() -> None:
        while True:
            with lock:
                i = next_index[0]
                if i >= len(bodies) or time.perf_counter() >= deadline:
                    return
                next_index[0] += 1
            record = _timed(send, i, bodies[i], time.perf_counter(), timeout)
            with lock:
                records.append(record)

    with ThreadPoolExecutor(concurrency, thread_name_prefix="closed") as pool:
        for f in [pool.submit(client) for _ in range(concurrency)]:
            f.result()
    end = max((r.end for r in records), default=time.perf_counter())
    return sorted(records, key=lambda r: r.index), end - begin


def open_loop(send: Send, bodies: list[dict], rate: float, seed: int, max_seconds: float, timeout: float):
    """Poisson arrivals at `rate`/s, one per body, on the schedule of `poisson_schedule(rate,
    len(bodies), seed)`; arrivals due after `max_seconds` are not sent. Latency counts from the
    scheduled arrival, so time spent queued in the client counts too. Returns (records, wall)."""
    offsets = poisson_schedule(rate, len(bodies), seed)
    pool = ThreadPoolExecutor(min(len(bodies), MAX_OPEN_LOOP_THREADS) or 1, thread_name_prefix="open")
    futures = []
    begin = time.perf_counter()
    try:
        for i, (body, offset) in enumerate(zip(bodies, offsets)):
            if offset > max_seconds:
                break
            while (delay := begin + offset - time.perf_counter()) > 0:  # never early
                time.sleep(delay)
            futures.append(pool.submit(_timed, send, i, body, begin + offset, timeout))
        done, _ = wait(futures, timeout=max_seconds + timeout + 30)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    records = []
    for i, f in enumerate(futures):
        if f in done:
            records.append(f.result())
        else:  # cannot happen with a target that honours its timeout; counted, never waited on
            now = time.perf_counter()
            records.append(Record(i, begin + offsets[i], now, now, Outcome(0, error="no answer in time")))
    end = max((r.end for r in records), default=time.perf_counter())
    return records, end - begin


# --- statistics -------------------------------------------------------------------------------


def parse_batch_sizes(value: str) -> dict[str, int]:
    """`x-dit-batch-sizes: text_encoder=4,denoiser=4,vae_decoder=4` -> {stage: size}."""
    out = {}
    for part in filter(None, (p.strip() for p in value.split(","))):
        stage, _, size = part.partition("=")
        if size.isdigit():
            out[stage.strip()] = int(size)
    return out


def parse_server_timing(value: str) -> dict[str, float]:
    """`Server-Timing: denoiser;dur=812.3, ...` -> {stage: seconds}."""
    out = {}
    for metric in filter(None, (m.strip() for m in value.split(","))):
        name, *params = (p.strip() for p in metric.split(";"))
        for p in params:
            key, _, dur = p.partition("=")
            if key == "dur":
                try:
                    out[name] = float(dur) / 1000.0
                except ValueError:
                    pass
    return out


def _header(headers: dict, name: str) -> str:
    return next((v for k, v in headers.items() if k.lower() == name.lower()), "")


def latency_stats(latencies: list[float]) -> dict:
    if not latencies:
        return {k: None for k in ("p50", "p95", "p99", "mean", "min", "max")}
    a = np.asarray(latencies, dtype=float)
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(a.mean()),
            "min": float(a.min()), "max": float(a.max())}


def stage_figures(records: list[Record]) -> tuple[dict, dict]:
    """Batch sizes seen per stage ({stage: {size: count}}) and mean stage time per stage (s)."""
    sizes: dict[str, Counter] = defaultdict(Counter)
    times: dict[str, list[float]] = defaultdict(list)
    for r in records:
        for stage, size in parse_batch_sizes(_header(r.outcome.headers, "x-dit-batch-sizes")).items():
            sizes[stage][size] += 1
        for stage, secs in parse_server_timing(_header(r.outcome.headers, "server-timing")).items():
            times[stage].append(secs)
    batch = {s: {str(k): v for k, v in sorted(c.items())} for s, c in sizes.items()}
    return batch, {s: float(np.mean(v)) for s, v in times.items()}


def latency_by_steps(records: list[Record], bodies: list[dict]) -> dict:
    """Latency figures of the 200s per step count (`num_inference_steps` of each record's body),
    for workloads that mix short and long requests."""
    groups: dict[int, list[float]] = defaultdict(list)
    for r in records:
        if r.outcome.status == 200:
            groups[int(bodies[r.index].get("num_inference_steps", 0))].append(r.latency)
    return {str(steps): {"ok": len(v), **latency_stats(v)} for steps, v in sorted(groups.items())}


def summarize(records: list[Record], wall: float, planned: int, bodies: list[dict] | None = None) -> dict:
    """The figures of one load point (with `bodies`, also its latency per step count)."""
    ok = [r for r in records if r.outcome.status == 200]
    images = sum(r.outcome.images for r in ok)
    codes = Counter(str(r.outcome.status) for r in records)
    errors = sorted({r.outcome.error for r in records if r.outcome.error})[:5]
    batch, stage_time = stage_figures(ok)
    return {
        "planned": planned,
        "sent": len(records),
        "ok": len(ok),
        "failed": len(records) - len(ok),
        "status_codes": dict(sorted(codes.items())),
        "errors": errors,
        "latency_s": latency_stats([r.latency for r in ok]),
        "images": images,
        "wall_s": wall,
        "images_per_s": images / wall if wall > 0 else None,
        "requests_per_s": len(ok) / wall if wall > 0 else None,
        "batch_sizes": batch or None,
        "stage_time_s": stage_time or None,
        "latency_by_steps_s": latency_by_steps(records, bodies) if bodies else None,
    }


# --- GPU utilisation --------------------------------------------------------------------------


class GpuSampler:
    """Mean `nvidia-smi` GPU utilisation (%) over a load point, sampled every `interval` s in a
    background thread; `mean` is None without nvidia-smi or samples."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = None
        self._binary = shutil.which("nvidia-smi")

    def _sample(self) -> None:
        cmd = [self._binary, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout
                values = [float(v) for v in out.split() if v.strip()]
                if values:
                    self.samples.append(sum(values) / len(values))
            except (subprocess.SubprocessError, OSError, ValueError):
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> "GpuSampler":
        if self._binary:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None
