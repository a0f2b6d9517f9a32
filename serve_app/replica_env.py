"""The Ray Serve settings dit-serve's replicas run with, as environment variables.

Serve (2.60) by default runs each replica's user code on an event loop in a thread of its own and
each handle's router on yet another loop, so every call between deployments crosses threads
several times; on a loaded host each crossing waits for the GIL. dit-serve's stages never block
their event loop (model work runs in executors, store calls in threads), so they can share the
replica's main loop: on the 2-core tiny config this took 15-25 ms off a request alone
(docs/benchmarks.md). The variables are read when a replica process starts, so they go in each
application's `runtime_env` (every shipped config has them; tests/unit/test_configs_env.py checks),
and the benchmarks and the test cluster pass the same ones to `ray.init`.
"""

from __future__ import annotations

from types import MappingProxyType

REPLICA_ENV = MappingProxyType(
    {
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
        "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    }
)
