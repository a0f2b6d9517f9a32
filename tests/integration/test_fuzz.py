"""The live app fuzzed from its own /openapi.json (schemathesis): over a thousand generated requests
across every documented route, valid and invalid, none answered with a 5xx, every answer's status,
content type, headers and body as the document says; the app healthy after.

One app of its own with tiny limits (64x64 images, at most 2 steps and 2 images), so the valid
generations the fuzzer finds are cheap; the generation is deterministic (derandomized) and has no
shrinking or example database, so a run is the same every time and bounded in time.
"""

from __future__ import annotations

import collections

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.integration.conftest import TEST_ARGS, own_store

APP, PREFIX = "fuzz", "/fuzz"
EXAMPLES_PER_OPERATION = 150  # x 8 operations with inputs (4 without run once each)
MIN_CASES = 1000
FAST = {"batching": {"max_batch_size": 2, "batch_wait_timeout_s": 0.0}}
FUZZ_ARGS = {
    **TEST_ARGS,
    "text_encoder": {**TEST_ARGS["text_encoder"], **FAST},
    "denoiser": {**TEST_ARGS["denoiser"], **FAST},
    "vae_decoder": {**TEST_ARGS["vae_decoder"], **FAST},
    "limits": {"min_size": 64, "max_size": 64, "max_n": 2, "max_steps": 2},
    "defaults": {"size": "64x64", "num_inference_steps": 1},
    "jobs": {"max_running": 2},
}
# (method, path) of every documented operation; the last test checks this is the whole document.
OPERATIONS = [
    ("POST", "/v1/images/generations"),
    ("POST", "/v1/images/jobs"),
    ("GET", "/v1/images/jobs"),
    ("GET", "/v1/images/jobs/{job_id}"),
    ("DELETE", "/v1/images/jobs/{job_id}"),
    ("GET", "/v1/images/jobs/{job_id}/events"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model}"),
    ("GET", "/images/{name}"),
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/v1/status"),
]


@pytest.fixture(scope="module")
def fuzz_url(ray_cluster):
    from ray import serve

    from serve_app.app import build_app

    serve.run(build_app(own_store(FUZZ_ARGS, APP)), name=APP, route_prefix=PREFIX)
    yield ray_cluster + PREFIX
    serve.delete(APP)


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_url):
    from schemathesis.config import SchemathesisConfig

    config = SchemathesisConfig.from_dict({"base-url": fuzz_url, "request-timeout": 120})
    return schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json", config=config)


@pytest.fixture(scope="module")
def tally():
    """Requests sent per operation, and statuses seen: for the totals checked at the end."""
    return {"cases": collections.Counter(), "statuses": collections.Counter(), "missed_deadlines": 0}


def checks():
    """Schemathesis' conformance checks; no-5xx is asserted in the test itself (see
    `missed_deadline`)."""
    from schemathesis.specs.openapi import checks as openapi

    return [
        openapi.status_code_conformance,
        openapi.content_type_conformance,
        openapi.response_headers_conformance,
        openapi.response_schema_conformance,
        openapi.negative_data_rejection,
    ]


def missed_deadline(case, response) -> bool:
    """The one 5xx a valid request may get: a 504 because the request asked for a deadline
    (`deadline_s`, any positive number) shorter than its run took."""
    body = case.body if isinstance(case.body, dict) else {}
    if response.status_code != 504 or not isinstance(body.get("deadline_s"), (int, float)):
        return False
    error = response.json()["error"]
    # schemathesis keeps each header as the list of its values
    return error["code"] == "deadline_exceeded" and [error["request_id"]] == response.headers["x-request-id"]


@pytest.mark.parametrize("method, path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_no_5xx_and_every_answer_as_documented(fuzz_schema, tally, method, path):
    """Valid and invalid requests (schemathesis' positive and negative modes) for one operation."""
    from schemathesis import GenerationMode

    operation = fuzz_schema[path][method]
    modes = [operation.as_strategy(GenerationMode.POSITIVE)]
    if operation.body or any(True for _ in operation.iter_parameters()):
        modes.append(operation.as_strategy(GenerationMode.NEGATIVE))
    selected = checks()

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=st.one_of(modes))
    def fuzz(case):
        response = case.call(timeout=120)
        tally["cases"][f"{method} {path}"] += 1
        tally["statuses"][response.status_code] += 1
        if response.status_code >= 500:
            assert missed_deadline(case, response), (response.status_code, response.text, case.body)
            tally["missed_deadlines"] += 1
        case.validate_response(response, checks=selected)

    fuzz()


def test_the_fuzzing_covered_every_route_and_the_app_is_healthy_after(fuzz_url, tally):
    documented = requests.get(f"{fuzz_url}/openapi.json", timeout=30).json()["paths"]
    operations = {f"{m.upper()} {p}" for p, item in documented.items() for m in item}
    assert operations == {f"{m} {p}" for m, p in OPERATIONS}
    assert set(tally["cases"]) == operations, set(operations) ^ set(tally["cases"])
    assert sum(tally["cases"].values()) >= MIN_CASES, tally
    server_errors = sum(n for status, n in tally["statuses"].items() if status >= 500)
    assert server_errors == tally["missed_deadlines"], tally  # no 5xx but asked-for deadlines
    assert any(200 <= s < 300 for s in tally["statuses"]) and any(400 <= s < 500 for s in tally["statuses"])
    health = requests.get(f"{fuzz_url}/health", timeout=30)
    assert health.status_code == 200, health.text
    ok = requests.post(f"{fuzz_url}/v1/images/generations", json={"prompt": "still here"}, timeout=120)
    assert ok.status_code == 200 and ok.json()["size"] == "64x64", ok.text
