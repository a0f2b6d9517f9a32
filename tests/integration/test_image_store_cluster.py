"""url images on a cluster: two ingress deployments (separate replica processes, as on two nodes)
share one S3-compatible bucket (a real local server, moto's); an image made through one is served
by the other, byte for byte, and its URL stops working when the retention ends."""

from __future__ import annotations

import base64
import time

import pytest
import requests

from tests.integration.conftest import TEST_ARGS, own_store
from tests.s3_server import TEST_CREDENTIALS

RETENTION_S = 6.0
BUCKET = "dit-serve-images"


@pytest.fixture(scope="module")
def apps(ray_cluster, s3_endpoint):
    from ray import serve

    from serve_app.app import build_graph
    from serve_app.config import AppConfig

    args = {
        **TEST_ARGS,
        "image_store": {
            "backend": "s3",
            "s3": {"bucket": BUCKET, "endpoint_url": s3_endpoint, "create_bucket": True},
        },
        "jobs": {"retention_s": RETENTION_S},
    }
    env = {"ray_actor_options": {"num_cpus": 0.1, "runtime_env": {"env_vars": dict(TEST_CREDENTIALS)}}}
    urls = {}
    for name in ("imga", "imgb"):
        config = AppConfig.model_validate(own_store(args, name))
        serve.run(build_graph(config, {"ImagesAPI": env}), name=name, route_prefix=f"/{name}")
        urls[name] = f"{ray_cluster}/{name}"
    yield urls
    for name in urls:
        serve.delete(name)


def test_an_image_made_on_one_ingress_is_served_by_another_then_expires(apps, s3_endpoint, monkeypatch):
    body = {"prompt": "a shared harbour", "size": "64x64", "seed": 11, "num_inference_steps": 2}
    made = requests.post(f"{apps['imga']}/v1/images/generations", json={**body, "response_format": "url"}, timeout=120)
    assert made.status_code == 200, made.text
    url_a = made.json()["data"][0]["url"]
    made_at = time.monotonic()
    assert url_a.startswith(f"{apps['imga']}/images/")
    url_b = url_a.replace("/imga/", "/imgb/")

    from_a = requests.get(url_a, timeout=30)
    from_b = requests.get(url_b, timeout=30)
    assert from_a.status_code == from_b.status_code == 200, (from_a.text, from_b.text)
    assert from_a.content == from_b.content and from_b.headers["content-type"] == "image/png"
    same = requests.post(f"{apps['imgb']}/v1/images/generations", json=body, timeout=120).json()
    assert from_b.content == base64.b64decode(same["data"][0]["b64_json"])

    for key, value in TEST_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert any(k.endswith(url_a.rsplit("/", 1)[1]) for k in keys), keys  # really in the bucket

    # The URL expires with the retention: polled (bounded) until it does, never before.
    status = 200
    while status == 200 and time.monotonic() - made_at < RETENTION_S + 30:
        status = requests.get(url_b, timeout=30).status_code
        if status == 200:
            assert time.monotonic() - made_at < RETENTION_S + 30
            time.sleep(0.5)  # polling period of a time-based expiry
    assert status == 404
    assert time.monotonic() - made_at >= RETENTION_S - 1.0  # not before its time
