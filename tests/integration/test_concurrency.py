"""Concurrent requests never mix: every answer is that request's own, tokens included."""

from __future__ import annotations

import re

import pytest
import torch

from tests.helpers import b64_image, concurrently, generate, max_level_diff

SUBJECTS = ["cat", "dog", "fox", "owl", "robot", "knight", "dragon", "ship"]
PLACES = ["in a forest", "on the moon", "under the sea", "in a city at night",
          "in the desert", "on a mountain", "in a library", "in the snow"]
PROMPTS = [f"a {s} {p}, {'highly detailed' if i % 2 else 'watercolor'}"
           for i, (s, p) in enumerate((s, p) for s in SUBJECTS for p in PLACES)]
# prompts of very different lengths, so wrong token ids would also show as wrong lengths
PROMPTS = [p if i % 3 else p + ", " + " ".join(SUBJECTS[: i % 8 + 1]) * 3 for i, p in enumerate(PROMPTS)]


def test_64_concurrent_http_requests_each_get_their_own_image(base_url, reference, logs_dir):
    assert len(set(PROMPTS)) == 64
    bodies = [{"prompt": p, "seed": 5000 + i, "size": "64x64"} for i, p in enumerate(PROMPTS)]
    responses = concurrently(lambda b: generate(base_url, b, timeout=300), bodies, workers=64)
    assert [r.status_code for r in responses] == [200] * 64
    ids = {r.headers["x-request-id"] for r in responses}
    assert len(ids) == 64
    for body, r in zip(bodies, responses):
        data = r.json()["data"]
        assert data[0]["seed"] == body["seed"]
        ref = reference.image(body["prompt"], body["seed"], width=64, height=64)
        assert max_level_diff(b64_image(data[0]["b64_json"]), ref) <= 1, body["prompt"]

    # no tokenizer error anywhere in the cluster's logs
    text = "\n".join(p.read_text(errors="replace") for p in logs_dir.rglob("*") if p.is_file() and p.suffix in (".log", ".err", ".out"))
    assert "Already borrowed" not in text
    encoder_logs = "\n".join(
        p.read_text(errors="replace") for p in logs_dir.rglob("replica_*TextEncoder*.log")
    )
    assert encoder_logs, "the TextEncoder replica's log exists"
    assert not re.search(r"Traceback|ERROR", encoder_logs)


@pytest.fixture(scope="module")
def solo_encoder(tiny_flux_path):
    from deployments.families import flux
    from deployments.families.base import LoadSpec

    return flux.TextEncoding(LoadSpec(path=tiny_flux_path, dtype="float32", device="cpu"))


def test_encoder_ids_and_embeddings_under_concurrent_load(base_url, solo_encoder):
    """Called at the deployment level, 64 at once (batched 8 at a time in the replica): each
    request's token ids equal its solo tokenization exactly, and its embeddings its solo ones."""
    from ray import serve

    from deployments.payloads import EncodeRequest
    from tests.integration.conftest import APP

    handle = serve.get_deployment_handle("TextEncoder", app_name=APP)
    responses = [handle.encode.remote(EncodeRequest(f"enc-{i}", p)) for i, p in enumerate(PROMPTS)]
    results = [r.result(timeout_s=120) for r in responses]
    batch_sizes = [res.trace[0].batch_size for res in results]
    assert max(batch_sizes) > 1, "requests were batched"
    for i, (prompt, res) in enumerate(zip(PROMPTS, results)):
        assert res.request_id == f"enc-{i}"
        tokens = solo_encoder.tokenize([prompt])
        encoded = solo_encoder.encode_prompt(tokens)
        for got, want in zip(res.input_ids, tokens.input_ids):
            assert torch.equal(got, want[0]), prompt
        torch.testing.assert_close(res.prompt_embeds, encoded.prompt_embeds, rtol=0, atol=1e-5)
        torch.testing.assert_close(res.pooled_prompt_embeds, encoded.pooled_prompt_embeds, rtol=0, atol=1e-5)
