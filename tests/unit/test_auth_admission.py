"""API keys (hashes only, constant-time comparison, 401 outside the open paths) and admission's
arithmetic (cost, Retry-After from measured throughput, deadlines)."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest

from deployments.errors import InvalidParameter, RateLimited, TooManyRequests
from deployments.job_store.base import AdmissionRejected
from deployments.sampling import SamplingParams
from serve_app.admission import AdmissionControl, request_cost
from serve_app.auth import ANONYMOUS, AuthMiddleware, KeyRing, Tenant, hash_key
from serve_app.config import AppConfig, AuthConfig


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def ring(**auth) -> KeyRing:
    return KeyRing.from_config(AuthConfig.model_validate(auth))


def test_hash_key_is_sha256_hex():
    assert hash_key("sk-alpha") == sha("sk-alpha")


def test_keys_from_config_env_and_file(tmp_path, monkeypatch):
    keyfile = tmp_path / "keys"
    keyfile.write_text(f"# team keys\ncarol:{sha('sk-carol')}  # on call\n\n")
    monkeypatch.setenv("DIT_KEYS", f"bob:{sha('sk-bob')},dave:{sha('sk-dave')}")
    keys = ring(
        keys=[{"name": "alice", "sha256": sha("sk-alice"), "requests_per_minute": 5}],
        keys_env="DIT_KEYS",
        keys_file=str(keyfile),
    )
    assert keys.tenant("Bearer sk-alice") == Tenant("alice", 5, None)
    assert keys.tenant("bearer sk-bob").name == "bob"  # the scheme is case-insensitive
    assert keys.tenant("Bearer sk-carol").name == "carol"
    assert keys.tenant("Bearer sk-dave").name == "dave"
    for header in (None, "", "Bearer", "Bearer  ", "Basic sk-alice", "Bearer sk-alicex", "sk-alice"):
        assert keys.tenant(header) is None, header


def test_without_keys_everyone_is_anonymous():
    keys = ring()
    assert not keys.enabled
    assert keys.tenant(None) == Tenant(ANONYMOUS)
    assert keys.tenant("Bearer anything") == Tenant(ANONYMOUS)


@pytest.mark.parametrize(
    "setup, message",
    [
        ({"keys_env": "DIT_KEYS_MISSING"}, "DIT_KEYS_MISSING is not set"),
        ({"keys_env": "DIT_KEYS_BAD"}, "entries must be name:sha256"),
    ],
)
def test_a_named_key_source_that_is_missing_or_malformed_fails_loudly(monkeypatch, setup, message):
    monkeypatch.delenv("DIT_KEYS_MISSING", raising=False)
    monkeypatch.setenv("DIT_KEYS_BAD", "alice:sk-plaintext-key")
    with pytest.raises(ValueError, match=message):
        ring(**setup)


def test_config_refuses_plaintext_and_relative_paths():
    with pytest.raises(ValueError, match="sha256"):
        AuthConfig.model_validate({"keys": [{"name": "a", "sha256": "sk-not-a-hash"}]})
    with pytest.raises(ValueError, match="absolute"):
        AuthConfig.model_validate({"keys_file": "keys.txt"})


async def _call(app, method: str, path: str, headers: dict[str, str], root_path: str = "") -> tuple[int, dict, bytes]:
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "root_path": root_path,
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


def _middleware():
    seen: list[Tenant] = []

    async def inner(scope, receive, send):
        seen.append(scope["state"]["tenant"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    keys = ring(keys=[{"name": "alice", "sha256": sha("sk-alice")}])
    return AuthMiddleware(inner, keys), seen


def test_middleware_401_names_the_header_and_passes_valid_keys():
    app, seen = _middleware()
    status, headers, body = asyncio.run(
        _call(app, "POST", "/v1/images/jobs", {"authorization": "Bearer wrong", "x-request-id": "r1"})
    )
    assert status == 401
    assert headers["www-authenticate"].startswith("Bearer")
    error = json.loads(body)["error"]
    assert (error["param"], error["code"]) == ("Authorization", "invalid_api_key")
    assert seen == []  # the app never ran
    status, _, _ = asyncio.run(_call(app, "GET", "/v1/models", {"authorization": "Bearer sk-alice"}))
    assert status == 200 and seen == [Tenant("alice")]


def test_middleware_leaves_liveness_docs_and_preflight_open():
    app, seen = _middleware()
    for method, path, headers in [
        ("GET", "/health", {}),
        ("GET", "/ready", {}),
        ("GET", "/openapi.json", {}),
        ("OPTIONS", "/v1/images/generations", {"access-control-request-method": "POST"}),
    ]:
        status, _, _ = asyncio.run(_call(app, method, path, headers))
        assert status == 200, path
    assert all(t.name == ANONYMOUS for t in seen)
    # Under a route prefix the open paths are the app's own (ASGI's path includes root_path).
    status, _, _ = asyncio.run(_call(app, "GET", "/adm/health", {}, root_path="/adm"))
    assert status == 200
    status, _, _ = asyncio.run(_call(app, "GET", "/adm/v1/models", {}, root_path="/adm"))
    assert status == 401
    # An OPTIONS that is not a CORS preflight is not open.
    status, _, body = asyncio.run(_call(app, "OPTIONS", "/v1/images/generations", {}))
    assert status == 401


def _sampling(n=1, steps=4, width=256, height=256) -> SamplingParams:
    return SamplingParams(
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=3.5,
        seeds=tuple(range(n)),
    )


def test_request_cost_is_images_times_steps_times_megapixels():
    assert request_cost(_sampling(n=2, steps=28, width=1024, height=1024)) == pytest.approx(
        2 * 28 * 1.048576
    )


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _control(**admission) -> tuple[AdmissionControl, Clock]:
    clock = Clock()
    config = AppConfig.model_validate({"admission": admission})
    return AdmissionControl(config, clock=clock), clock


def test_retry_after_uses_the_hint_then_the_measured_throughput():
    control, clock = _control(max_pending_cost=10, throughput_hint=2.0, max_retry_after_s=60)
    refused = control.refused(AdmissionRejected("cost", 9.0, 3), 5.0, Tenant(ANONYMOUS))
    assert isinstance(refused, TooManyRequests) and refused.status == 429
    assert refused.retry_after_s == 2  # (9 + 5 - 10) / 2 per second
    for _ in range(30):  # 30 s of finishing 1 cost unit a second
        clock.now += 1.0
        control.finished(1.0)
    assert control.throughput() == pytest.approx(1.0)
    assert control.refused(AdmissionRejected("cost", 9.0, 3), 5.0, Tenant(ANONYMOUS)).retry_after_s == 4
    clock.now += 120.0  # nothing finished for two minutes: the measurement expires
    assert control.throughput() == pytest.approx(2.0)
    huge = control.refused(AdmissionRejected("cost", 1e6, 3), 5.0, Tenant(ANONYMOUS))
    assert huge.retry_after_s == 60  # capped


def test_per_key_limits_and_their_refusals():
    control, _ = _control(max_active_per_key=2, requests_per_minute=10)
    alice = Tenant("alice", requests_per_minute=3, max_active=5)
    assert control.limits(alice).owner_max_active == 5
    assert control.limits(Tenant("bob")).owner_max_active == 2
    assert control.rate_limit(alice) == 3 and control.rate_limit(Tenant("bob")) == 10
    refused = control.refused(AdmissionRejected("owner_active", 1.0, 2), 1.0, Tenant("bob"))
    assert isinstance(refused, RateLimited) and "2 unfinished" in refused.message
    assert control.rate_refused(alice, 12.2).retry_after_s == 13


def test_deadlines_default_and_bounds():
    control, _ = _control(default_deadline_s=30, max_deadline_s=100)
    assert control.deadline_s(None) == 30
    assert control.deadline_s(5.5) == 5.5
    with pytest.raises(InvalidParameter) as info:
        control.deadline_s(101)
    assert info.value.param == "deadline_s"
    with pytest.raises(ValueError, match="default_deadline_s"):
        AppConfig.model_validate({"admission": {"default_deadline_s": 200, "max_deadline_s": 100}})
