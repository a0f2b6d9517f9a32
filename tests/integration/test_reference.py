"""The service's image equals diffusers' FluxPipeline in-process, for the same checkpoint and seed.

Tolerance: 0 levels expected for a request alone (every stage runs a batch of one, the same ops
as the pipeline); the assertion allows 1 8-bit level, the documented fp32 batch-size effect, in
case another request shares a batch.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.helpers import b64_image, batch_sizes, decode_image, generate, max_level_diff


@pytest.mark.parametrize(
    "prompt, seed, size, steps, guidance",
    [
        ("a photo of a cat", 1, "256x256", 4, 3.5),
        ("a lighthouse on a cliff at sunset, oil painting", 123456789, "192x128", 6, 5.0),
    ],
)
def test_service_image_equals_pipeline(base_url, reference, prompt, seed, size, steps, guidance):
    w, h = map(int, size.split("x"))
    r = generate(
        base_url,
        {"prompt": prompt, "seed": seed, "size": size, "num_inference_steps": steps, "guidance_scale": guidance},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["size"] == size and body["output_format"] == "png"
    assert [d["seed"] for d in body["data"]] == [seed]
    ours = b64_image(body["data"][0]["b64_json"])
    ref = reference.image(prompt, seed, width=w, height=h, steps=steps, guidance=guidance)
    assert ours.shape == (h, w, 3)
    diff = max_level_diff(ours, ref)
    if batch_sizes(r) == {"text_encoder": 1, "denoiser": 1, "vae_decoder": 1}:
        assert diff == 0
    assert diff <= 1


def test_n_images_use_consecutive_seeds(base_url, reference):
    r = generate(base_url, {"prompt": "two foxes", "seed": 70, "n": 3, "size": "128x128"})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["seed"] for d in data] == [70, 71, 72]
    refs = reference.images("two foxes", 70, width=128, height=128, n=3)
    assert [max_level_diff(b64_image(d["b64_json"]), ref) for d, ref in zip(data, refs)] == [0, 0, 0]
    assert batch_sizes(r)["denoiser"] >= 3


@pytest.mark.parametrize("fmt, mime", [("jpeg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")])
def test_output_formats(base_url, reference, fmt, mime):
    """Each format holds the reference image as PIL encodes it (quality 95 for lossy ones)."""
    import base64

    r = generate(base_url, {"prompt": "a blue bird", "seed": 5, "size": "128x64", "output_format": fmt})
    assert r.status_code == 200, r.text
    assert r.json()["output_format"] == fmt
    raw = base64.b64decode(r.json()["data"][0]["b64_json"])
    with Image.open(io.BytesIO(raw)) as im:
        assert im.format == mime and im.size == (128, 64)
        pixels = np.asarray(im.convert("RGB")).astype(np.int16)
    ref = reference.image("a blue bird", 5, width=128, height=64)
    buf = io.BytesIO()
    Image.fromarray(ref.astype(np.uint8)).save(buf, format=mime, quality=95)
    expected = decode_image(buf.getvalue())
    assert max_level_diff(pixels, expected) <= 1


def test_output_compression_trades_size_for_quality(base_url):
    import base64

    sizes = []
    for compression in (90, 20):
        r = generate(
            base_url,
            {"prompt": "a blue bird", "seed": 5, "size": "128x64", "output_format": "jpeg", "output_compression": compression},
        )
        assert r.status_code == 200, r.text
        sizes.append(len(base64.b64decode(r.json()["data"][0]["b64_json"])))
    assert sizes[1] < sizes[0]
