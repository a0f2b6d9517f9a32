"""The naive baseline server: one shared diffusers FluxPipeline behind a threading.Lock, FastAPI +
uvicorn, the same HTTP shape as dit-serve's generations route. What people hand-write.

    python bench/naive_server.py --model-path /path/to/flux --dtype bfloat16 --port 8100

POST /v1/images/generations {prompt, n, size "WxH", seed, num_inference_steps, guidance_scale}
  -> {"created": ..., "data": [{"b64_json": <PNG base64>}, ...]};  GET /health -> {"status": "ok"}
"""

from __future__ import annotations

import argparse
import base64
import io
import random
import sys
import threading
import time

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field


class GenerationRequest(BaseModel):
    prompt: str
    n: int = Field(1, ge=1, le=16)
    size: str = Field("1024x1024", pattern=r"^\d+x\d+$")
    seed: int | None = None
    num_inference_steps: int = Field(28, ge=1, le=1000)
    guidance_scale: float = 3.5


def png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def make_app(pipe, device: str) -> FastAPI:
    import torch

    app = FastAPI(title="naive FluxPipeline server")
    lock = threading.Lock()

    def generate(req: GenerationRequest) -> list[str]:
        width, height = map(int, req.size.split("x"))
        seed = req.seed if req.seed is not None else random.randrange(2**31)
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(req.n)]
        with lock:
            images = pipe(
                req.prompt,
                width=width,
                height=height,
                num_inference_steps=req.num_inference_steps,
                guidance_scale=req.guidance_scale,
                num_images_per_prompt=req.n,
                generator=generators,
            ).images
            if device == "cuda":
                torch.cuda.synchronize()
        return [png_b64(im) for im in images]

    @app.post("/v1/images/generations")
    async def generations(req: GenerationRequest) -> dict:
        data = await run_in_threadpool(generate, req)
        return {"created": int(time.time()), "data": [{"b64_json": b} for b in data]}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    return app


def load_pipeline(model_path: str, dtype: str):
    import torch
    from diffusers import FluxPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    pipe = FluxPipeline.from_pretrained(model_path, dtype=dtypes[dtype]).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, device


def main() -> int:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", required=True, help="a local diffusers FLUX folder")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--port", type=int, default=8100)
    ns = parser.parse_args()
    pipe, device = load_pipeline(ns.model_path, ns.dtype)
    uvicorn.run(make_app(pipe, device), host="127.0.0.1", port=ns.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
