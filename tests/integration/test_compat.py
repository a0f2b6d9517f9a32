"""What a new user of the OpenAI API expects, through Serve's proxy on the package's app: the
`openai` client's `models.retrieve`, `null` meaning a default, gpt-image fields, HEAD, one
X-Request-ID on every response, x-dit-job-id on errors once a request has its record, and the
body limits and /docs as a deployed app serves them."""

from __future__ import annotations

import re

import pytest
import requests

from tests.helpers import job_events, submit_job

SMALL = {"size": "64x64", "num_inference_steps": 1}


@pytest.fixture(scope="module")
def client(base_url):
    from openai import OpenAI

    return OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def test_models_retrieve_with_the_openai_client(client):
    import openai

    model = client.models.retrieve("tiny-flux")
    assert model.id == "tiny-flux" and model.object == "model"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("black-forest-labs/FLUX.1-dev")  # sent as .../black-forest-labs%2FFLUX.1-dev
    assert info.value.body["param"] == "model"
    assert "black-forest-labs/FLUX.1-dev" in info.value.body["message"]
    assert "tiny-flux" in info.value.body["message"]


def test_null_for_every_optional_field_means_its_default(base_url):
    optional = [
        "model", "n", "size", "response_format", "output_format", "output_compression", "quality",
        "style", "user", "background", "moderation", "seed", "guidance_scale", "stream", "partial_images",
    ]
    body = {"prompt": "a null cat", "num_inference_steps": 1, **{name: None for name in optional}}
    r = requests.post(f"{base_url}/v1/images/generations", json=body, timeout=120)
    assert r.status_code == 200, r.text
    result = r.json()
    assert (result["size"], result["output_format"], len(result["data"])) == ("256x256", "png", 1)
    assert result["data"][0]["b64_json"]
    job = submit_job(base_url, {"prompt": "a null job", "n": None, "priority": None, **SMALL})
    assert job.status_code == 202, job.text


def test_gpt_image_fields_with_the_openai_client(client):
    import openai

    result = client.images.generate(
        model="tiny-flux",
        prompt="an opaque fox",
        size="auto",
        background="opaque",
        moderation="low",
        quality="auto",
        extra_body={"num_inference_steps": 1},
    )
    assert result.size == "256x256" and result.data[0].b64_json
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="a glass", background="transparent", extra_body=SMALL)
    assert info.value.body["param"] == "background" and "opaque" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="a glass", extra_body={**SMALL, "moderation": "strict"})
    assert info.value.body["param"] == "moderation"


def test_head_on_get_routes_through_the_proxy(base_url):
    image = requests.post(
        f"{base_url}/v1/images/generations", json={"prompt": "a head", "response_format": "url", **SMALL}, timeout=120
    ).json()["data"][0]["url"]
    job = submit_job(base_url, {"prompt": "a finished job", **SMALL}).json()["id"]
    job_events(base_url, job)  # until it ends
    paths = [
        "/v1/models",
        "/v1/models/tiny-flux",
        "/v1/models/nope",
        "/health",
        "/openapi.json",
        "/docs",
        "/docs/static/swagger-ui.css",
        image.removeprefix(base_url),
        "/images/" + "a" * 32 + ".png",
        f"/v1/images/jobs/{job}",
        "/v1/images/jobs?limit=1",
    ]
    for path in paths:
        get = requests.get(base_url + path, timeout=60)
        head = requests.head(base_url + path, timeout=60)
        assert head.status_code == get.status_code, path
        assert head.content == b"", path
        for name in ("content-type", "content-length"):
            assert head.headers.get(name) == get.headers.get(name), (path, name)
    head = requests.head(f"{base_url}/v1/images/jobs/{job}/events", timeout=30)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"].startswith("text/event-stream")


def test_every_response_carries_exactly_one_request_id(base_url):
    gen = f"{base_url}/v1/images/generations"
    job = submit_job(base_url, {"prompt": "an id", **SMALL}).json()["id"]
    job_events(base_url, job)
    responses = [
        requests.get(f"{base_url}/v1/models", timeout=30),
        requests.get(f"{base_url}/v1/nothing", timeout=30),
        requests.get(gen, timeout=30),  # 405
        requests.post(gen, json={"prompt": "x", "size": "100x100"}, timeout=30),
        requests.post(gen, data=b"{}", headers={"content-type": "text/plain"}, timeout=30),
        requests.post(gen, data=b"[" * 5000, headers={"content-type": "application/json"}, timeout=30),
        requests.head(f"{base_url}/docs", timeout=30),
        requests.get(f"{base_url}/v1/images/jobs/{job}/events", timeout=60),
        requests.get(f"{base_url}/images/" + "a" * 32 + ".png", timeout=30),
    ]
    for r in responses:
        assert re.fullmatch(r"[A-Za-z0-9-]+", r.headers.get("x-request-id", "")), (r.url, r.headers)
    mine = requests.get(f"{base_url}/v1/models", headers={"X-Request-ID": "my-trace-7"}, timeout=30)
    assert mine.headers["x-request-id"] == "my-trace-7"


def test_x_dit_job_id_is_on_errors_once_the_request_has_a_record(base_url):
    gen = f"{base_url}/v1/images/generations"
    early = requests.post(gen, json={"prompt": "x", "size": "100x100"}, timeout=30)
    assert early.status_code == 400 and "x-dit-job-id" not in early.headers  # refused before any record
    late = requests.post(gen, json={"prompt": "too late", "deadline_s": 0.001, **SMALL}, timeout=120)
    assert late.status_code == 504, late.text
    job = late.headers["x-dit-job-id"]
    assert late.json()["error"]["request_id"] == late.headers["x-request-id"]
    record = requests.get(f"{base_url}/v1/images/jobs/{job}", timeout=30)
    assert record.status_code == 200 and record.json()["status"] == "failed", record.text
    ok = requests.post(gen, json={"prompt": "in time", **SMALL}, timeout=120)
    assert ok.status_code == 200 and re.fullmatch(r"job_[0-9a-f]{24}", ok.headers["x-dit-job-id"])


def test_body_limits_through_the_proxy(base_url):
    gen = f"{base_url}/v1/images/generations"
    r = requests.post(gen, data=b" " * 2_000_000, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    chunked = requests.post(
        gen, data=(b" " * 100_000 for _ in range(30)), headers={"content-type": "application/json"}, timeout=60
    )
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "payload_too_large"
    deep = requests.post(gen, data=b'{"prompt": ' + b"[" * 5000, headers={"content-type": "application/json"}, timeout=30)
    assert deep.status_code == 400 and "32 levels" in deep.json()["error"]["message"]
    form = requests.post(gen, data={"prompt": "a cat"}, timeout=30)
    assert form.status_code == 415 and form.json()["error"]["param"] == "Content-Type"
    assert requests.get(f"{base_url}/health", timeout=60).status_code == 200


def test_docs_are_served_offline_through_the_proxy(base_url):
    page = requests.get(f"{base_url}/docs", timeout=30)
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
    assets = re.findall(r"""(?:src|href)="([^"]+)\"""", page.text)
    assert assets and all(a.startswith("/docs/static/") for a in assets), assets
    for asset in assets:
        assert requests.get(base_url + asset, timeout=30).status_code == 200, asset
    doc = requests.get(f"{base_url}/openapi.json", timeout=30).json()
    assert "ImageGenerationRequest" in doc["components"]["schemas"]
