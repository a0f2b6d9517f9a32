"""A burst far past capacity against a running dit-serve: how many were admitted, how many got
429 (with Retry-After), whether anything got a 5xx or hung, the admitted requests' latency, and
the Ray processes' memory before and after.

    make serve   # in another terminal (configs/local.yaml on 127.0.0.1:8000)
    python bench/burst.py --requests 600 --timeout 60

Bounded: exactly --requests requests, each with a client timeout; prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor


def ray_rss_mib() -> float:
    import psutil

    total = 0
    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if cmdline.startswith("ray::") or "raylet" in cmdline or "gcs_server" in cmdline:
                total += proc.info["memory_info"].rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, TypeError):
            continue
    return total / 2**20


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    import requests

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--timeout", type=float, default=60.0, help="client timeout per request (s)")
    parser.add_argument("--body", default='{"prompt": "a burst of lanterns"}', help="JSON request body")
    parser.add_argument("--key", default=None, help="API key, if the app requires one")
    ns = parser.parse_args()
    body = json.loads(ns.body)
    headers = {"Authorization": f"Bearer {ns.key}"} if ns.key else {}
    barrier = threading.Barrier(ns.requests)

    def one(i: int):
        try:
            barrier.wait(timeout=60)
        except threading.BrokenBarrierError:
            pass
        started = time.monotonic()
        try:
            r = requests.post(
                f"{ns.url}/v1/images/generations", json={**body, "seed": i}, headers=headers, timeout=ns.timeout
            )
            return r.status_code, r.headers.get("retry-after"), time.monotonic() - started
        except requests.exceptions.Timeout:
            return "timeout", None, time.monotonic() - started
        except requests.exceptions.ConnectionError:
            return "connection_error", None, time.monotonic() - started

    health: list[tuple[str, float]] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            t = time.monotonic()
            try:
                status = str(requests.get(f"{ns.url}/health", timeout=5).status_code)
            except requests.exceptions.RequestException as exc:
                status = type(exc).__name__
            health.append((status, time.monotonic() - t))
            stop.wait(0.25)

    before = ray_rss_mib()
    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=ns.requests) as pool:
        results = list(pool.map(one, range(ns.requests)))
    wall = time.monotonic() - started
    stop.set()
    watcher.join()
    after = ray_rss_mib()

    admitted = [t for s, _, t in results if s == 200]
    rejected = [ra for s, ra, _ in results if s == 429]
    statuses: dict[str, int] = {}
    for s, _, _ in results:
        statuses[str(s)] = statuses.get(str(s), 0) + 1
    print(
        json.dumps(
            {
                "requests": ns.requests,
                "wall_s": round(wall, 2),
                "statuses": statuses,
                "admitted": len(admitted),
                "rejected_429": len(rejected),
                "rejected_with_retry_after": sum(1 for ra in rejected if ra),
                "retry_after_s_median": statistics.median([int(ra) for ra in rejected if ra]) if rejected else None,
                "server_errors_5xx": sum(1 for s, _, _ in results if isinstance(s, int) and s >= 500),
                "admitted_latency_s": {
                    "p50": percentile(admitted, 0.5),
                    "p99": percentile(admitted, 0.99),
                    "max": max(admitted, default=None),
                },
                "health": {
                    "checks": len(health),
                    "not_200": [s for s, _ in health if s != "200"][:10],
                    "max_s": round(max((t for _, t in health), default=0.0), 3),
                },
                "ray_rss_mib": {"before": round(before), "after": round(after)},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
