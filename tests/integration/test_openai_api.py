"""The stock openai client works unchanged against the server; url responses are served."""

from __future__ import annotations

import base64
import io

import pytest
import requests
from PIL import Image

from tests.helpers import decode_image, max_level_diff


@pytest.fixture(scope="module")
def client(base_url):
    from openai import OpenAI

    return OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-flux"]


def test_generate_b64_with_extensions(client, reference):
    result = client.images.generate(
        model="tiny-flux",
        prompt="a watercolor of a fox",
        size="128x128",
        response_format="b64_json",
        extra_body={"seed": 9, "num_inference_steps": 4},
    )
    image = decode_image(base64.b64decode(result.data[0].b64_json))
    assert max_level_diff(image, reference.image("a watercolor of a fox", 9, width=128, height=128)) <= 1


def test_generate_url_then_fetch(client, base_url):
    result = client.images.generate(prompt="a lighthouse", size="64x128", response_format="url", n=2)
    urls = [d.url for d in result.data]
    assert len(set(urls)) == 2
    for url in urls:
        assert url.startswith(base_url + "/images/")
        r = requests.get(url, timeout=30)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(r.content)) as im:
            assert im.size == (64, 128)


def test_client_errors_surface_as_openai_errors(client):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="x", size="100x100")
    assert info.value.body["param"] == "size"
    with pytest.raises(openai.NotFoundError):
        client.images.generate(prompt="x", model="gpt-image-1")


@pytest.mark.parametrize("name", ["..%2F..%2Fetc%2Fpasswd", "%2e%2e%2fsecret.png", "x" * 32 + ".png", "../../etc/passwd"])
def test_image_route_rejects_unknown_and_traversal(base_url, name):
    r = requests.get(f"{base_url}/images/{name}", timeout=30)
    assert r.status_code == 404
    assert "root:" not in r.text
