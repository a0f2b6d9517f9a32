"""The request logic behind the routes: validate against the deployed config, run the DAG.

The three stage calls are chained by passing each `DeploymentResponse` straight into the next
`.remote()`, so embeddings and latents travel replica to replica through the object store and only
the encoded images come back here. Torch-free: this runs in the ingress replica.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from typing import Callable, Optional

from deployments.payloads import EncodedImages, EncodeRequest, GenerationSpec, Rejected, StageTrace
from serve_app.config import AppConfig, parse_size
from serve_app.errors import InvalidParameter, ModelNotFound
from serve_app.image_store import LocalImageStore
from serve_app.protocol import ImageData, ImageGenerationRequest, ImagesResponse, ModelCard, ModelList

STAGES = ("text_encoder", "denoiser", "vae_decoder")
HEALTH_TIMEOUT_S = 10.0


class ImageService:
    def __init__(self, config: AppConfig, text_encoder, denoiser, vae_decoder, store: LocalImageStore):
        self.config = config
        self._stages = {"text_encoder": text_encoder, "denoiser": denoiser, "vae_decoder": vae_decoder}
        self.store = store
        self._created = int(time.time())

    # -- validation ---------------------------------------------------------------------------
    def plan(self, req: ImageGenerationRequest, request_id: str) -> tuple[EncodeRequest, GenerationSpec]:
        """Check a request against the deployed model's limits; what each stage will be asked."""
        cfg, lim, defaults = self.config, self.config.limits, self.config.defaults
        if req.model is not None and req.model != cfg.model.name:
            raise ModelNotFound(
                f"model {req.model!r} is not served here; available: [{cfg.model.name!r}]", "model"
            )
        if not req.prompt.strip():
            raise InvalidParameter("prompt must not be empty", "prompt")
        if len(req.prompt) > lim.max_prompt_chars:
            raise InvalidParameter(
                f"prompt is {len(req.prompt)} characters; the limit is {lim.max_prompt_chars}", "prompt"
            )
        if req.n > lim.max_n:
            raise InvalidParameter(f"n must be between 1 and {lim.max_n}", "n")
        width, height = self._size(req.size or defaults.size)
        steps = req.num_inference_steps or defaults.num_inference_steps
        if steps > lim.max_steps:
            raise InvalidParameter(
                f"num_inference_steps must be between 1 and {lim.max_steps}", "num_inference_steps"
            )
        guidance = defaults.guidance_scale if req.guidance_scale is None else req.guidance_scale
        if guidance > lim.max_guidance_scale:
            raise InvalidParameter(
                f"guidance_scale must be between 0 and {lim.max_guidance_scale}", "guidance_scale"
            )
        fmt = req.output_format or defaults.output_format
        if req.output_compression is not None and fmt == "png":
            raise InvalidParameter(
                "output_compression applies to jpeg and webp only", "output_compression"
            )
        seed = secrets.randbits(32) if req.seed is None else req.seed
        spec = GenerationSpec(
            request_id=request_id,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=float(guidance),
            seeds=tuple((seed + i) % 2**64 for i in range(req.n)),
            output_format=fmt,
            output_compression=req.output_compression,
        )
        return EncodeRequest(request_id=request_id, prompt=req.prompt), spec

    def _size(self, size: str) -> tuple[int, int]:
        try:
            width, height = parse_size(size)
        except ValueError:
            raise InvalidParameter(f"size must look like 1024x1024, got {size!r}", "size") from None
        error = self.config.size_error(width, height)
        if error:
            raise InvalidParameter(f"size {size}: {error}", "size")
        return width, height

    # -- generation ---------------------------------------------------------------------------
    async def generate(
        self,
        req: ImageGenerationRequest,
        request_id: str,
        image_url: Callable[[str], str],
    ) -> tuple[ImagesResponse, tuple[StageTrace, ...]]:
        encode_request, spec = self.plan(req, request_id)
        embeddings = self._stages["text_encoder"].encode.remote(encode_request)
        latents = self._stages["denoiser"].denoise.remote(embeddings, spec)
        images: EncodedImages | Rejected = await self._stages["vae_decoder"].decode.remote(latents)
        if isinstance(images, Rejected):
            raise images.error
        data = []
        for blob, seed in zip(images.images, spec.seeds):
            if req.response_format == "url":
                name = await asyncio.to_thread(self.store.save, blob, images.output_format)
                data.append(ImageData(url=image_url(name), seed=seed))
            else:
                data.append(ImageData(b64_json=base64.b64encode(blob).decode("ascii"), seed=seed))
        response = ImagesResponse(
            created=int(time.time()),
            data=data,
            output_format=images.output_format,
            size=f"{images.width}x{images.height}",
        )
        return response, images.trace

    # -- metadata -----------------------------------------------------------------------------
    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.config.model.name, created=self._created)])

    async def health(self) -> tuple[bool, dict]:
        """Ask every stage whether it can serve; (all ok, per-stage detail)."""

        async def probe(name: str) -> tuple[str, Optional[str]]:
            try:
                await asyncio.wait_for(self._stages[name].ready.remote(), HEALTH_TIMEOUT_S)
                return name, None
            except asyncio.TimeoutError:
                return name, f"no answer within {HEALTH_TIMEOUT_S}s"
            except Exception as exc:  # noqa: BLE001 - reported as the stage's state
                return name, type(exc).__name__

        results = await asyncio.gather(*(probe(name) for name in STAGES))
        detail = {name: ("ok" if err is None else err) for name, err in results}
        return all(err is None for _, err in results), detail
