"""Three models in one application (tiny FLUX, SD3 and PixArt-Sigma), each with its own stage
deployments: images equal each family's diffusers pipeline in-process (with and without a
negative prompt, at two sizes), concurrent requests to different models never share a batch, each
family's text encoder keeps its token ids under 64 concurrent requests, and jobs, streams and
cancellation work for every family."""

from __future__ import annotations

import re

import numpy as np
import pytest
import requests

from tests.helpers import (
    b64_image,
    concurrently,
    generate,
    is_step,
    job_events,
    max_level_diff,
    sse_events,
    submit_job,
)
from tests.integration.conftest import TEST_ARGS, own_store

APP = "multi"
MODELS = {"tiny-flux": "flux", "tiny-sd3": "sd3", "tiny-pixart": "pixart"}
PIPELINES = {"sd3": "StableDiffusion3Pipeline", "pixart": "PixArtSigmaPipeline"}
ARGS = {
    **{k: v for k, v in TEST_ARGS.items() if k != "model"},
    # Nine stage replicas and three workers beside the package's app: small CPU shares.
    "denoiser": {**TEST_ARGS["denoiser"], "worker_num_cpus": 0.1},
    "models": [{"model": {"name": name, "path": f"builtin:{name}"}} for name in MODELS],
    "limits": {"min_size": 64, "max_size": 256, "max_n": 4, "max_steps": 50},
    "defaults": {"size": "64x64", "num_inference_steps": 4},
}


@pytest.fixture(scope="module")
def multi_url(ray_cluster):
    from ray import serve

    from serve_app.app import build_graph
    from serve_app.config import AppConfig

    small = {"ray_actor_options": {"num_cpus": 0.1}}
    options = {f"{stage}-{m}": small for m in MODELS for stage in ("TextEncoder", "VAEDecoder")}
    config = AppConfig.model_validate(own_store(ARGS, APP))
    serve.run(build_graph(config, options), name=APP, route_prefix=f"/{APP}")
    yield f"{ray_cluster}/{APP}"
    serve.delete(APP)


class FamilyReference:
    """The family's own diffusers pipeline in-process, one torch thread (as the test stages run),
    called as the service computes: same max_sequence_length; PixArt without caption cleaning or
    resolution binning (the service generates the size asked)."""

    def __init__(self, family: str):
        import diffusers
        import torch

        from deployments.families.specs import family_spec
        from deployments.tiny.store import resolve_model_path

        self._torch = torch
        path = resolve_model_path(f"builtin:tiny-{family}")
        self.pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(path, dtype=torch.float32)
        self.pipe.set_progress_bar_config(disable=True)
        self.extra = {"max_sequence_length": family_spec(family).default_max_sequence_length}
        if family == "pixart":
            self.extra.update(clean_caption=False, use_resolution_binning=False)

    def images(self, prompt, seed, negative_prompt=None, width=64, height=64, steps=4, guidance=None, n=1):
        torch = self._torch
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            out = self.pipe(
                prompt,
                negative_prompt=negative_prompt or "",  # PixArt needs a string; "" is both defaults
                width=width,
                height=height,
                num_inference_steps=steps,
                guidance_scale=guidance,
                num_images_per_prompt=n,
                generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(n)],
                output_type="np",
                **self.extra,
            ).images
        finally:
            torch.set_num_threads(threads)
        return [(img * 255).round().astype(np.int16) for img in out]


@pytest.fixture(scope="module")
def references():
    from deployments.families.specs import family_spec

    made = {}

    def get(family: str) -> FamilyReference:
        if family not in made:
            made[family] = FamilyReference(family)
        return made[family]

    get.default_guidance = lambda family: family_spec(family).default_guidance_scale
    return get


def test_models_are_listed_and_an_unknown_one_is_a_404(multi_url):
    listed = requests.get(f"{multi_url}/v1/models", timeout=30).json()
    assert [m["id"] for m in listed["data"]] == list(MODELS)
    assert requests.get(f"{multi_url}/v1/models/tiny-sd3", timeout=30).json()["id"] == "tiny-sd3"
    r = generate(multi_url, {"prompt": "a fox", "model": "tiny-sdxl"})
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["param"] == "model"
    assert all(name in error["message"] for name in MODELS)
    r = generate(multi_url, {"prompt": "a fox", "negative_prompt": "blurry"})  # the default: FLUX
    assert r.status_code == 400 and r.json()["error"]["param"] == "negative_prompt"


@pytest.mark.parametrize("family", ["sd3", "pixart"])
@pytest.mark.parametrize(
    "body",
    [
        {"size": "64x64"},  # CFG with the default (empty) negative prompt
        {"size": "96x128", "negative_prompt": "blurry, low contrast"},
        {"size": "64x64", "negative_prompt": "ignored without guidance", "guidance_scale": 1.0},
    ],
    ids=["cfg-default", "cfg-negative", "no-cfg"],
)
def test_each_family_equals_its_diffusers_pipeline(multi_url, references, family, body):
    """A request alone: 0 levels from the pipeline's image."""
    model = f"tiny-{family}"
    request = {"prompt": "a lighthouse on a cliff", "model": model, "seed": 11, **body}
    r = generate(multi_url, request)
    assert r.status_code == 200, r.text
    width, height = map(int, body["size"].split("x"))
    guidance = body.get("guidance_scale", references.default_guidance(family))
    negative = body.get("negative_prompt") if guidance > 1 else None
    want = references(family).images(request["prompt"], 11, negative, width, height, 4, guidance)[0]
    got = b64_image(r.json()["data"][0]["b64_json"])
    assert got.shape == (height, width, 3)
    assert max_level_diff(got, want) == 0


@pytest.mark.parametrize("family", ["sd3", "pixart"])
def test_n_images_in_one_batch_match_the_pipeline(multi_url, references, family):
    r = generate(
        multi_url,
        {"prompt": "a red fox", "model": f"tiny-{family}", "seed": 40, "n": 3, "negative_prompt": "dark"},
    )
    assert r.status_code == 200, r.text
    guidance = references.default_guidance(family)
    want = references(family).images("a red fox", 40, "dark", guidance=guidance, n=3)
    got = [b64_image(d["b64_json"]) for d in r.json()["data"]]
    assert [d["seed"] for d in r.json()["data"]] == [40, 41, 42]
    assert max(max_level_diff(g, w) for g, w in zip(got, want)) <= 1


def test_concurrent_requests_to_different_models_never_share_a_batch(multi_url, references, reference, logs_dir):
    """24 requests at once, 8 per model: every image equals its own model's pipeline, and each
    model's denoiser only ever saw its own model's requests."""
    prompts = ["a cat", "a ship at sea", "a castle", "a forest path", "a robot", "an owl", "a desert", "a city"]
    bodies = []
    for model, family in MODELS.items():
        for i, prompt in enumerate(prompts):
            body = {"prompt": f"{prompt}, {model}", "model": model, "seed": 300 + i}
            if i % 2 and family != "flux":
                body["negative_prompt"] = "fog"
            bodies.append(body)
    responses = concurrently(lambda b: generate(multi_url, b, timeout=300), bodies, workers=len(bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies), [r.text for r in responses if r.status_code != 200]
    for body, r in zip(bodies, responses):
        family = MODELS[body["model"]]
        if family == "flux":
            want = reference.image(body["prompt"], body["seed"], width=64, height=64)
        else:
            guidance = references.default_guidance(family)
            want = references(family).images(body["prompt"], body["seed"], body.get("negative_prompt", ""), guidance=guidance)[0]
        assert max_level_diff(b64_image(r.json()["data"][0]["b64_json"]), want) <= 1, body
    jobs = {r.headers["x-dit-job-id"]: body["model"] for body, r in zip(bodies, responses)}
    for model in MODELS:
        logs = "\n".join(
            p.read_text(errors="replace") for p in logs_dir.rglob(f"replica_{APP}_Denoiser-{model}_*.log")
        )
        seen = set(re.findall(r"job_[0-9a-f]{24}", logs)) & set(jobs)
        assert seen == {j for j, m in jobs.items() if m == model}, model


@pytest.mark.parametrize("family", ["sd3", "pixart"])
def test_owned_tokenizers_under_64_concurrent_requests(multi_url, family):
    """At the deployment, 64 encode calls at once (prompt + negative prompt each, batched): every
    request's token ids and embeddings (its negative prompt's too) equal its solo encoding."""
    import torch
    from ray import serve

    from deployments.families.base import LoadSpec
    from deployments.families.specs import family_spec, load_family
    from deployments.payloads import EncodeRequest
    from deployments.tiny.store import resolve_model_path

    spec = family_spec(family)
    solo = load_family(family).TextEncoding(
        LoadSpec(resolve_model_path(f"builtin:tiny-{family}"), "float32", "cpu", spec.default_max_sequence_length)
    )
    words = ["cat", "dog", "fox", "owl", "robot", "knight", "dragon", "ship"]
    prompts = [f"a {w} number {i}" + ", detailed" * (i % 5) for i, w in enumerate(words * 8)]
    negatives = [f"blurry {w}" * (i % 3) for i, w in enumerate(reversed(words * 8))]
    handle = serve.get_deployment_handle(f"TextEncoder-tiny-{family}", app_name=APP)
    calls = [
        handle.encode.remote(EncodeRequest(f"enc-{family}-{i}", p, negative_prompt=n))
        for i, (p, n) in enumerate(zip(prompts, negatives))
    ]
    results = [c.result(timeout_s=180) for c in calls]
    assert max(res.trace[0].batch_size for res in results) > 1, "requests were batched"
    for i, (p, n, res) in enumerate(zip(prompts, negatives, results)):
        assert res.request_id == f"enc-{family}-{i}"
        tokens = solo.tokenize([p])
        encoded = solo.encode_prompt(tokens)
        negative = solo.encode_prompt(solo.tokenize([n]))
        for got, want in zip(res.input_ids, tokens.input_ids):
            assert torch.equal(got, want[0]), p
        torch.testing.assert_close(res.prompt_embeds, encoded.prompt_embeds, rtol=0, atol=1e-5)
        torch.testing.assert_close(res.negative_prompt_embeds, negative.prompt_embeds, rtol=0, atol=1e-5)
        if encoded.prompt_attention_mask is not None:
            assert torch.equal(res.prompt_attention_mask, encoded.prompt_attention_mask)
            assert torch.equal(res.negative_prompt_attention_mask, negative.prompt_attention_mask)
        else:
            torch.testing.assert_close(res.pooled_prompt_embeds, encoded.pooled_prompt_embeds, rtol=0, atol=1e-5)
            torch.testing.assert_close(
                res.negative_pooled_prompt_embeds, negative.pooled_prompt_embeds, rtol=0, atol=1e-5
            )


@pytest.mark.parametrize("family", ["sd3", "pixart"])
def test_jobs_streams_and_cancellation_work_for_every_family(multi_url, references, family):
    model = f"tiny-{family}"
    # An async job: queued -> completed, its image the pipeline's.
    job = submit_job(multi_url, {"prompt": "a harbour", "model": model, "seed": 5, "partial_images": 1})
    assert job.status_code == 202, job.text
    events = job_events(multi_url, job.json()["id"])
    assert events[-1]["event"] == "completed"
    assert [e["data"]["step"] for e in events if e["event"] == "step"] == [1, 2, 3, 4]
    assert any(e["event"] == "preview" for e in events)
    final = requests.get(job.json()["status_url"], timeout=30).json()
    want = references(family).images("a harbour", 5, "", guidance=references.default_guidance(family))[0]
    assert max_level_diff(b64_image(final["result"]["data"][0]["b64_json"]), want) == 0
    # A streamed request: partial images, then the completed image.
    with requests.post(
        f"{multi_url}/v1/images/generations",
        json={"prompt": "a harbour", "model": model, "seed": 5, "stream": True, "partial_images": 1},
        stream=True,
        timeout=120,
    ) as r:
        assert r.status_code == 200
        streamed = list(sse_events(r))
    assert streamed[-1]["event"] == "image_generation.completed"
    assert max_level_diff(b64_image(streamed[-1]["data"]["b64_json"]), want) == 0
    # A long job cancelled mid-run: it stops within two steps.
    long = submit_job(multi_url, {"prompt": "a storm", "model": model, "num_inference_steps": 50, "size": "256x256"})
    until_step = job_events(multi_url, long.json()["id"], until=is_step(2))
    assert until_step[-1]["event"] == "step"
    cancel = requests.delete(long.json()["status_url"], timeout=30)
    assert cancel.status_code == 200
    events = job_events(multi_url, long.json()["id"])
    assert events[-1]["event"] == "cancelled"
    assert events[-1]["data"]["steps_done"] < 50
