"""Batch invariance: a request's image does not depend on who shares its batch."""

from __future__ import annotations

import pytest

from tests.helpers import b64_image, batch_sizes, concurrently, generate, max_level_diff
from tests.integration.conftest import TEST_ARGS, own_store

REQUEST_APP = "batch-request-mode"

PROMPTS = [
    "a cat on a sofa",
    "a dog in the rain",
    "an astronaut riding a horse",
    "a bowl of fruit, still life",
    "a dragon over a castle",
    "a city street at night, neon",
    "a sailing ship in a storm",
    "a field of sunflowers",
]


def test_seed_alone_equals_same_seed_in_a_batch_of_eight(base_url, reference):
    bodies = [{"prompt": p, "seed": 1000 + i, "size": "128x128"} for i, p in enumerate(PROMPTS)]
    alone = generate(base_url, bodies[3])
    assert alone.status_code == 200
    assert batch_sizes(alone)["denoiser"] == 1
    alone_image = b64_image(alone.json()["data"][0]["b64_json"])

    responses = concurrently(lambda b: generate(base_url, b), bodies, workers=len(bodies))
    assert [r.status_code for r in responses] == [200] * 8
    # The proof that they shared: in the default step mode a request's denoiser batch size is the
    # most rows it shared a call with (eight when all reach the denoiser within one step; the
    # text encoder may hand them over in more than one batch).
    shared = [batch_sizes(r)["denoiser"] for r in responses]
    assert all(2 <= n <= 8 for n in shared), shared
    images = [b64_image(r.json()["data"][0]["b64_json"]) for r in responses]
    # fp32 on CPU: within one 8-bit level of the same seed alone
    assert max_level_diff(images[3], alone_image) <= 1
    for body, image in zip(bodies, images):
        ref = reference.image(body["prompt"], body["seed"], width=128, height=128)
        assert max_level_diff(image, ref) <= 1, body


@pytest.fixture(scope="module")
def request_mode_url(ray_cluster):
    """The package's test app with `denoiser.batching.mode: request`."""
    from ray import serve

    from serve_app.app import build_app

    denoiser = {**TEST_ARGS["denoiser"], "batching": {**TEST_ARGS["denoiser"]["batching"], "mode": "request"}}
    serve.run(build_app(own_store({**TEST_ARGS, "denoiser": denoiser}, REQUEST_APP)), name=REQUEST_APP,
              route_prefix=f"/{REQUEST_APP}")
    yield f"{ray_cluster}/{REQUEST_APP}"
    serve.delete(REQUEST_APP)


MIXED = [
    {"prompt": "a red apple", "seed": 1, "size": "128x128"},
    {"prompt": "a green pear", "seed": 2, "size": "192x128"},
    {"prompt": "a yellow banana", "seed": 3, "size": "128x128", "n": 2},
    {"prompt": "an orange", "seed": 4, "size": "192x128", "num_inference_steps": 5},
    {"prompt": "a lemon", "seed": 5, "size": "128x128", "guidance_scale": 7.0},
    {"prompt": "a plum", "seed": 6, "size": "192x128"},
]


def mixed_window(url, reference) -> list:
    """MIXED sent at once: every request gets its own images (the same seed's reference)."""
    responses = concurrently(lambda b: generate(url, b), MIXED, workers=len(MIXED))
    assert [r.status_code for r in responses] == [200] * len(MIXED)
    for body, r in zip(MIXED, responses):
        w, h = map(int, body["size"].split("x"))
        refs = reference.images(
            body["prompt"],
            body["seed"],
            width=w,
            height=h,
            steps=body.get("num_inference_steps", 4),
            guidance=body.get("guidance_scale", 3.5),
            n=body.get("n", 1),
        )
        got = [b64_image(d["b64_json"]) for d in r.json()["data"]]
        assert len(got) == len(refs)
        assert max(max_level_diff(g, ref) for g, ref in zip(got, refs)) <= 1, body
    return responses


def test_mixed_shapes_and_settings_in_one_window(base_url, reference):
    """The default step mode: same-size requests may share calls whatever their steps and
    guidance, never with another size. A request's calls held only its own size's rows: 128x128
    ones are 1 + 2 + 1 images, 192x128 ones 1 + 1 + 1."""
    for body, r in zip(MIXED, mixed_window(base_url, reference)):
        assert batch_sizes(r)["denoiser"] <= (4 if body["size"] == "128x128" else 3), (body, batch_sizes(r))


def test_request_mode_splits_a_window_by_key(request_mode_url, reference):
    """The request mode: requests arriving together are split by key (size, steps, guidance);
    same-key ones (128x128, 4 steps, 3.5) share one transformer batch of 1 + 2 images."""
    responses = mixed_window(request_mode_url, reference)
    assert batch_sizes(responses[0])["denoiser"] == 3
    assert batch_sizes(responses[4])["denoiser"] == 1  # the lemon: its own guidance, its own batch
