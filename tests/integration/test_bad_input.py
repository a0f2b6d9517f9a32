"""Malformed requests through the real app: a 4xx naming the parameter, and the app stays up."""

from __future__ import annotations

import pytest
import requests

from tests.helpers import generate

CASES = [
    # (description, raw body or JSON, status, param)
    ("malformed JSON", b'{"prompt": "a cat"', 400, None),
    ("not an object", b'["a cat"]', 400, None),
    ("missing prompt", {"size": "64x64"}, 400, "prompt"),
    ("prompt of wrong type", {"prompt": ["a", "cat"]}, 400, "prompt"),
    ("empty prompt", {"prompt": "  "}, 400, "prompt"),
    ("over-long prompt (tokens)", {"prompt": "cat " * 600}, 400, "prompt"),
    ("over-long prompt (chars)", {"prompt": "c" * 5000}, 400, "prompt"),
    ("size not WxH", {"prompt": "x", "size": "large"}, 400, "size"),
    ("size not a multiple of 16", {"prompt": "x", "size": "100x128"}, 400, "size"),
    ("size too large", {"prompt": "x", "size": "4096x4096"}, 400, "size"),
    ("size too small", {"prompt": "x", "size": "16x16"}, 400, "size"),
    ("n too large", {"prompt": "x", "n": 50}, 400, "n"),
    ("n zero", {"prompt": "x", "n": 0}, 400, "n"),
    ("n as string", {"prompt": "x", "n": "2"}, 400, "n"),
    ("steps too many", {"prompt": "x", "num_inference_steps": 1000}, 400, "num_inference_steps"),
    ("steps zero", {"prompt": "x", "num_inference_steps": 0}, 400, "num_inference_steps"),
    ("guidance too high", {"prompt": "x", "guidance_scale": 99.0}, 400, "guidance_scale"),
    ("guidance negative", {"prompt": "x", "guidance_scale": -2}, 400, "guidance_scale"),
    ("seed negative", {"prompt": "x", "seed": -5}, 400, "seed"),
    ("unknown model", {"prompt": "x", "model": "dall-e-3"}, 404, "model"),
    ("unknown parameter", {"prompt": "x", "negative_prompt": "y"}, 400, "negative_prompt"),
    ("bad response_format", {"prompt": "x", "response_format": "file"}, 400, "response_format"),
    ("bad output_format", {"prompt": "x", "output_format": "bmp"}, 400, "output_format"),
]


@pytest.mark.parametrize("desc, body, status, param", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_a_clear_4xx(base_url, desc, body, status, param):
    url = f"{base_url}/v1/images/generations"
    if isinstance(body, bytes):
        r = requests.post(url, data=body, headers={"content-type": "application/json"}, timeout=60)
    else:
        r = requests.post(url, json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    assert "Traceback" not in r.text


def test_unknown_route_and_method(base_url):
    r = requests.get(f"{base_url}/v1/nothing", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = requests.get(f"{base_url}/v1/images/generations", timeout=30)
    assert r.status_code == 405 and "error" in r.json()


def test_healthy_and_serving_after_bad_input(base_url):
    for _, body, _, _ in CASES:
        if isinstance(body, dict):
            generate(base_url, body)
    health = requests.get(f"{base_url}/ready", timeout=60)
    assert health.status_code == 200
    assert health.json()["stages"] == {"text_encoder": "ok", "denoiser": "ok", "vae_decoder": "ok"}
    ok = generate(base_url, {"prompt": "still working", "size": "64x64"})
    assert ok.status_code == 200
