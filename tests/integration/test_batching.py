"""Batch invariance: a request's image does not depend on who shares its batch."""

from __future__ import annotations

from tests.helpers import b64_image, batch_sizes, concurrently, generate, max_level_diff

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
    # the proof that a batch formed: every request ran in a denoiser batch of all eight
    assert [batch_sizes(r)["denoiser"] for r in responses] == [8] * 8
    images = [b64_image(r.json()["data"][0]["b64_json"]) for r in responses]
    # fp32 on CPU: within one 8-bit level of the same seed alone
    assert max_level_diff(images[3], alone_image) <= 1
    for body, image in zip(bodies, images):
        ref = reference.image(body["prompt"], body["seed"], width=128, height=128)
        assert max_level_diff(image, ref) <= 1, body


def test_mixed_shapes_and_settings_in_one_window(base_url, reference):
    """Requests of different shapes arriving together are split by shape key, never mixed."""
    bodies = [
        {"prompt": "a red apple", "seed": 1, "size": "128x128"},
        {"prompt": "a green pear", "seed": 2, "size": "192x128"},
        {"prompt": "a yellow banana", "seed": 3, "size": "128x128", "n": 2},
        {"prompt": "an orange", "seed": 4, "size": "192x128", "num_inference_steps": 5},
        {"prompt": "a lemon", "seed": 5, "size": "128x128", "guidance_scale": 7.0},
        {"prompt": "a plum", "seed": 6, "size": "192x128"},
    ]
    responses = concurrently(lambda b: generate(base_url, b), bodies, workers=len(bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies)
    for body, r in zip(bodies, responses):
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
    # same-key requests (128x128, 4 steps, 3.5) shared one transformer batch: 1 + 2 images
    assert batch_sizes(responses[0])["denoiser"] == 3
