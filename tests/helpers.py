"""Test helpers: the in-process reference pipeline and image comparison."""

from __future__ import annotations

import base64
import io

import numpy as np


def decode_image(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def b64_image(b64: str) -> np.ndarray:
    return decode_image(base64.b64decode(b64))


def max_level_diff(a: np.ndarray, b: np.ndarray) -> int:
    """Largest per-pixel difference in 8-bit levels (shapes must match)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


class ReferencePipeline:
    """`FluxPipeline.__call__` in-process, one call per request, results cached.

    It runs with one torch thread, as the test app's stages do: CPU reductions split across a
    different number of threads round differently (seen: 4 pixels of a 256x256 image one 8-bit
    level apart between 1 and 2 threads), and the reference comparison is meant to be exact.
    """

    def __init__(self, path: str):
        import torch
        from diffusers import FluxPipeline

        self._torch = torch
        self.pipe = FluxPipeline.from_pretrained(path, dtype=torch.float32)
        self.pipe.set_progress_bar_config(disable=True)
        self._cache: dict = {}

    def images(self, prompt, seed, width=256, height=256, steps=4, guidance=3.5, n=1):
        key = (prompt, seed, width, height, steps, guidance, n)
        if key not in self._cache:
            generators = [self._torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]
            threads = self._torch.get_num_threads()
            self._torch.set_num_threads(1)
            try:
                out = self._call(prompt, width, height, steps, guidance, n, generators)
            finally:
                self._torch.set_num_threads(threads)
            self._cache[key] = [(img * 255).round().astype(np.int16) for img in out]
        return self._cache[key]

    def _call(self, prompt, width, height, steps, guidance, n, generators):
        return self.pipe(
            prompt,
            width=width,
            height=height,
            num_inference_steps=steps,
            guidance_scale=guidance,
            num_images_per_prompt=n,
            generator=generators,
            output_type="np",
        ).images

    def image(self, prompt, seed, **kw) -> np.ndarray:
        return self.images(prompt, seed, **kw)[0]


def generate(base_url: str, body: dict, timeout: float = 120.0):
    """POST /v1/images/generations; the `requests` response."""
    import requests

    return requests.post(f"{base_url}/v1/images/generations", json=body, timeout=timeout)


def batch_sizes(response) -> dict[str, int]:
    """The x-dit-batch-sizes header as {stage: rows in the batch the request ran in}."""
    header = response.headers["x-dit-batch-sizes"]
    return {k: int(v) for k, v in (part.split("=") for part in header.split(","))}


def concurrently(fn, items, workers: int):
    """Call fn on every item from `workers` threads released together; results in item order."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    barrier = threading.Barrier(min(workers, len(items)))

    def run(item):
        try:
            barrier.wait(timeout=30)
        except threading.BrokenBarrierError:
            pass
        return fn(item)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(run, items))


def process_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (a SIGSTOPped process is alive)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def sse_events(response):
    """Parse a text/event-stream `requests` response into {"event", "id", "data"} dicts (data
    parsed as JSON), as an EventSource would."""
    import json

    event: dict = {}
    for line in response.iter_lines(decode_unicode=True):
        if line is None:
            continue
        if line == "":
            if "data" in event:
                event["data"] = json.loads(event["data"])
                yield event
            event = {}
        elif line.startswith(":"):
            continue  # a comment (keep-alive ping)
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "data" and "data" in event:
                event["data"] += "\n" + value
            elif field in ("event", "id", "data"):
                event[field] = value


def submit_job(base_url: str, body: dict, headers: dict | None = None, timeout: float = 60.0):
    import requests

    return requests.post(f"{base_url}/v1/images/jobs", json=body, headers=headers or {}, timeout=timeout)


def job_events(base_url: str, job_id: str, headers: dict | None = None, until=None, timeout: float = 300.0):
    """The job's events from its events stream, until the stream ends (the job ended) or `until`
    (a predicate on an event) is true for one, which is then the last one returned."""
    import requests

    out = []
    with requests.get(
        f"{base_url}/v1/images/jobs/{job_id}/events", headers=headers or {}, stream=True, timeout=timeout
    ) as response:
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/event-stream")
        for event in sse_events(response):
            out.append(event)
            if until is not None and until(event):
                break
    return out


def is_step(n: int):
    """Predicate: a `step` event at step >= n."""
    return lambda e: e["event"] == "step" and e["data"]["step"] >= n


def run_row_alone(dn, row):
    """A family row (step-level batching) through all its steps in calls of its own; its latents."""
    while not row.done:
        dn.forward_rows([row])
    return dn.finish_row(row)


def max_abs_diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def guided_inputs(cond, uncond, sampling):
    """`DenoiseInputs` from a TextEncoding's `encode_prompt` results, as the TextEncoder stage hands
    them on: `uncond` (the negative prompts' encoding) None without classifier-free guidance."""
    from deployments.families.base import DenoiseInputs

    def negative(name):
        return None if uncond is None else getattr(uncond, name)

    return DenoiseInputs(
        prompt_embeds=cond.prompt_embeds,
        pooled_prompt_embeds=cond.pooled_prompt_embeds,
        prompt_attention_mask=cond.prompt_attention_mask,
        negative_prompt_embeds=negative("prompt_embeds"),
        negative_pooled_prompt_embeds=negative("pooled_prompt_embeds"),
        negative_prompt_attention_mask=negative("prompt_attention_mask"),
        sampling=sampling,
    )
