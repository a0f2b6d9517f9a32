"""A request checked against the deployed config and turned into what each stage is asked.

`accept` fixes everything random once (the seed), so a request re-run after a failure or a restart
gives the same images; `plan` is then pure. Torch-free: this runs in the ingress replica.
"""

from __future__ import annotations

import secrets

from deployments.errors import InvalidParameter, ModelNotFound
from deployments.families.specs import family_spec
from deployments.payloads import EncodeRequest, GenerationSpec
from deployments.sampling import SamplingParams
from serve_app.config import AppConfig, parse_size
from serve_app.protocol import ImageGenerationRequest


class Planner:
    def __init__(self, config: AppConfig):
        self.config = config
        self.models = config.views()  # model name -> its config (limits, defaults, family)
        self.default_model = next(iter(self.models))

    def accept(self, req: ImageGenerationRequest) -> tuple[ImageGenerationRequest, GenerationSpec]:
        """The request as it will be run, every time (checked, its seed fixed), and its plan."""
        if req.seed is None:
            req = req.model_copy(update={"seed": secrets.randbits(32)})
        return req, self.plan(req, "check")[1]

    def plan(self, req: ImageGenerationRequest, request_id: str) -> tuple[EncodeRequest, GenerationSpec]:
        """Check a request against the deployed model's limits; what each stage will be asked."""
        model = self.default_model if req.model is None else req.model
        if model not in self.models:
            raise ModelNotFound(
                f"model {req.model!r} is not served here; available: {list(self.models)}", "model"
            )
        cfg = self.models[model]
        lim, defaults = cfg.limits, cfg.defaults
        if not req.prompt.strip():
            raise InvalidParameter("prompt must not be empty", "prompt")
        for param in ("prompt", "negative_prompt"):
            text = getattr(req, param) or ""
            if len(text) > lim.max_prompt_chars:
                raise InvalidParameter(
                    f"{param} is {len(text)} characters; the limit is {lim.max_prompt_chars}", param
                )
        if req.n > lim.max_n:
            raise InvalidParameter(f"n must be between 1 and {lim.max_n}", "n")
        width, height = self._size(cfg, req.size or defaults.size)
        steps = req.num_inference_steps or defaults.num_inference_steps
        if steps > lim.max_steps:
            raise InvalidParameter(
                f"num_inference_steps must be between 1 and {lim.max_steps}", "num_inference_steps"
            )
        guidance = cfg.default_guidance_scale if req.guidance_scale is None else req.guidance_scale
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
        sampling = SamplingParams(
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=float(guidance),
            seeds=tuple((seed + i) % 2**64 for i in range(req.n)),
        )
        spec = GenerationSpec(
            request_id=request_id,
            sampling=sampling,
            model=model,
            output_format=fmt,
            output_compression=req.output_compression,
            partial_images=req.partial_images or 0,
        )
        negative = self._negative_prompt(cfg, req, guidance)
        return EncodeRequest(request_id=request_id, prompt=req.prompt, negative_prompt=negative), spec

    @staticmethod
    def _negative_prompt(cfg: AppConfig, req: ImageGenerationRequest, guidance: float):
        """The unconditional branch's prompt when the request runs with classifier-free guidance
        (as diffusers: guidance_scale > 1, "" unless given), else None. A negative prompt given
        with guidance <= 1 is ignored, as diffusers ignores it."""
        family = family_spec(cfg.model.family)
        if not family.cfg:
            if req.negative_prompt:
                raise InvalidParameter(
                    f"model {cfg.model.name!r} ({family.name}) takes no negative_prompt: FLUX.1 is"
                    " guidance-distilled (its guidance_scale is an input, not classifier-free"
                    " guidance)",
                    "negative_prompt",
                )
            return None
        return (req.negative_prompt or "") if guidance > 1 else None

    @staticmethod
    def _size(cfg: AppConfig, size: str) -> tuple[int, int]:
        try:
            width, height = parse_size(size)
        except ValueError:
            raise InvalidParameter(f"size must look like 1024x1024, got {size!r}", "size") from None
        error = cfg.size_error(width, height)
        if error:
            raise InvalidParameter(f"size {size}: {error}", "size")
        return width, height
