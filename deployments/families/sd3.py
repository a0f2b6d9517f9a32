"""Stable Diffusion 3 / 3.5 in three roles, built on diffusers' own StableDiffusion3Pipeline.

For one checkpoint, seed and settings the three roles chained give the image
`StableDiffusion3Pipeline.__call__` gives in-process (diffusers 0.42.1): tokenization and encoding
follow `encode_prompt` / `_get_clip_prompt_embeds` / `_get_t5_prompt_embeds` (CLIP-L and CLIP-G
penultimate hidden states side by side, padded to T5's width, then T5's sequence; pooled = both
CLIP projections), denoising follows `__call__` step by step (a fresh scheduler per batch, one CPU
`torch.Generator` per image, classifier-free guidance through `guidance.guided_prediction`), and
decoding follows its tail. Negative prompts are encoded exactly as prompts are, as the pipeline
does. Not supported: skip-layer guidance and IP-adapters (off by default in diffusers).

For step-level batching, `prepare_rows` keeps each image as an `SD3Row` with its own scheduler, and
`forward_rows` runs rows at different steps, with different step counts and guidance (with CFG or
without), in one transformer call (`guided_rows`: a row with CFG takes two transformer rows).

With a `ParallelContext` of `cfg_degree` 2 the two guidance branches run on two ranks. Sequence
parallelism (Ulysses/ring) is not available for this family yet: `AppConfig` refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import count
from typing import Any, ClassVar, Optional, Sequence

import numpy as np
import torch

from deployments.families.base import (
    DenoiseInputs,
    EncodedPrompts,
    LoadSpec,
    ParallelContext,
    TokenizedPrompts,
    torch_dtype,
)
from deployments.families.flux import t5_tokens
from deployments.families.guidance import guided_prediction, guided_rows
from deployments.families.rows import check_rows, row_tensors
from deployments.families.speed import apply_speed_knobs, cache_context, new_run, padded_call
from deployments.sampling import SamplingParams


class TextEncoding:
    """CLIP-L + CLIP-G (pooled and sequence) + T5 (sequence). Owns its three tokenizers."""

    def __init__(self, load: LoadSpec):
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        dtype = torch_dtype(load.dtype)
        self.device = torch.device(load.device)
        self.max_sequence_length = load.max_sequence_length
        self.tokenizer = CLIPTokenizer.from_pretrained(load.path, subfolder="tokenizer")
        self.tokenizer_2 = CLIPTokenizer.from_pretrained(load.path, subfolder="tokenizer_2")
        self.tokenizer_3 = T5TokenizerFast.from_pretrained(load.path, subfolder="tokenizer_3")
        self.text_encoder = CLIPTextModelWithProjection.from_pretrained(
            load.path, subfolder="text_encoder", dtype=dtype
        ).to(self.device).eval()
        self.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            load.path, subfolder="text_encoder_2", dtype=dtype
        ).to(self.device).eval()
        self.text_encoder_3 = T5EncoderModel.from_pretrained(
            load.path, subfolder="text_encoder_3", dtype=dtype
        ).to(self.device).eval()
        self.clip_max_length = self.tokenizer.model_max_length

    def tokenize(self, prompts: list[str]) -> TokenizedPrompts:
        clip = [
            tok(prompts, padding="max_length", max_length=self.clip_max_length, truncation=True, return_tensors="pt").input_ids
            for tok in (self.tokenizer, self.tokenizer_2)
        ]
        t5, counts = t5_tokens(self.tokenizer_3, prompts, self.max_sequence_length)
        return TokenizedPrompts(input_ids=(*clip, t5.input_ids), token_counts=counts)

    @torch.no_grad()
    def encode_prompt(self, tokens: TokenizedPrompts) -> EncodedPrompts:
        clip_l_ids, clip_g_ids, t5_ids = tokens.input_ids
        dtype = self.text_encoder.dtype
        hidden, pooled = [], []
        for encoder, ids in ((self.text_encoder, clip_l_ids), (self.text_encoder_2, clip_g_ids)):
            out = encoder(ids.to(self.device), output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2].to(dtype=dtype))
        clip_embeds = torch.cat(hidden, dim=-1)
        t5_embeds = self.text_encoder_3(t5_ids.to(self.device))[0].to(dtype=self.text_encoder_3.dtype)
        clip_embeds = torch.nn.functional.pad(clip_embeds, (0, t5_embeds.shape[-1] - clip_embeds.shape[-1]))
        return EncodedPrompts(
            prompt_embeds=torch.cat([clip_embeds, t5_embeds], dim=-2),
            pooled_prompt_embeds=torch.cat(pooled, dim=-1),
        )


class Denoising:
    """The SD3 transformer inside a StableDiffusion3Pipeline with no VAE or text encoders."""

    def __init__(self, load: LoadSpec, parallel: Optional[ParallelContext] = None):
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

        from deployments.families.flux import vae_scale_factor

        if parallel is not None and parallel.sp_degree > 1:
            raise ValueError("sd3: sequence parallelism (ulysses/ring) is not supported; use cfg_degree")
        self.device = torch.device(load.device)
        self.parallel = parallel
        self.max_sequence_length = load.max_sequence_length
        self.transformer = SD3Transformer2DModel.from_pretrained(
            load.path, subfolder="transformer", dtype=torch_dtype(load.dtype)
        ).to(self.device).eval()
        self.buckets = load.batch_buckets
        apply_speed_knobs(self.transformer, load, self.transformer.transformer_blocks)
        self.scheduler_config = FlowMatchEulerDiscreteScheduler.load_config(load.path, subfolder="scheduler")
        self.vae_scale_factor = vae_scale_factor(load.path)
        self.rows_forwarded: tuple[int, ...] = ()  # keys of the rows in the last `forward_rows`
        self._row_keys = count()  # each SD3Row's key, unique for this Denoising (unlike id())
        if parallel is not None:  # xDiT's groups (the CFG group) for this rank
            from xfuser.core.distributed.runtime_state import initialize_runtime_state

            initialize_runtime_state(self.pipeline(), parallel.engine_config)

    def pipeline(self):
        """A pipeline for one batch: shares the transformer, owns a fresh scheduler."""
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline(
            transformer=self.transformer,
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config),
            vae=None,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            text_encoder_3=None,
            tokenizer_3=None,
        )
        pipe.vae_scale_factor = self.vae_scale_factor
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def schedule(self, scheduler, latents: torch.Tensor, steps: int) -> tuple[torch.Tensor, int]:
        """`StableDiffusion3Pipeline.__call__`'s timesteps for `latents` (rows, channels, h, w),
        set on `scheduler` (the resolution shift `mu` where the scheduler shifts dynamically)."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
            retrieve_timesteps,
        )

        config, kwargs = scheduler.config, {}
        if config.get("use_dynamic_shifting", None):
            patch = self.transformer.config.patch_size
            seq_len = (latents.shape[2] // patch) * (latents.shape[3] // patch)
            kwargs["mu"] = calculate_shift(
                seq_len,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),
            )
        return retrieve_timesteps(scheduler, steps, self.device, **kwargs)

    @torch.no_grad()
    def prepare(self, inputs: DenoiseInputs) -> "SD3Run":
        """`StableDiffusion3Pipeline.__call__` up to its denoising loop, with embeddings given."""
        sampling = inputs.sampling
        pipe = self.pipeline()
        dtype = self.transformer.dtype
        latents = pipe.prepare_latents(
            sampling.n,
            self.transformer.config.in_channels,
            sampling.height,
            sampling.width,
            dtype,
            self.device,
            [torch.Generator("cpu").manual_seed(s) for s in sampling.seeds],
        )
        timesteps, steps = self.schedule(pipe.scheduler, latents, sampling.num_inference_steps)

        def rows(tensor):
            return None if tensor is None else tensor.to(self.device, dtype)

        new_run(self.transformer)
        return SD3Run(
            scheduler=pipe.scheduler,
            timesteps=timesteps,
            num_steps=steps,
            guidance_scale=sampling.guidance_scale,
            latents=latents,
            prompt_embeds=rows(inputs.prompt_embeds),
            pooled_prompt_embeds=rows(inputs.pooled_prompt_embeds),
            negative_prompt_embeds=rows(inputs.negative_prompt_embeds),
            negative_pooled_prompt_embeds=rows(inputs.negative_pooled_prompt_embeds),
        )

    def _forward(self, t):
        def forward(hidden_states, branch):
            return padded_call(
                self.transformer,
                self.buckets,
                {
                    "hidden_states": hidden_states,
                    "timestep": t.expand(hidden_states.shape[0]),
                    "encoder_hidden_states": branch["encoder_hidden_states"],
                    "pooled_projections": branch["pooled_projections"],
                },
                joint_attention_kwargs=None,
            )

        return forward

    @torch.no_grad()
    def step(self, run: "SD3Run", keep: Optional[Sequence[int]] = None) -> None:
        """One iteration of `StableDiffusion3Pipeline.__call__`'s loop."""
        if keep is not None:
            run.keep(keep)
            new_run(self.transformer)
        t = run.timesteps[run.step_index]
        cond = {"encoder_hidden_states": run.prompt_embeds, "pooled_projections": run.pooled_prompt_embeds}
        uncond = None
        if run.negative_prompt_embeds is not None:
            uncond = {
                "encoder_hidden_states": run.negative_prompt_embeds,
                "pooled_projections": run.negative_pooled_prompt_embeds,
            }
        with cache_context(self.transformer):
            noise_pred = guided_prediction(self._forward(t), run.latents, cond, uncond, run.guidance_scale, self.parallel)
        run.latents = run.scheduler.step(noise_pred, t, run.latents, return_dict=False)[0]
        run.noise_pred = noise_pred
        run.step_index += 1

    @torch.no_grad()
    def preview(self, run: "SD3Run", rows: Sequence[int]) -> list[np.ndarray]:
        """Flow matching predicts x0 = x_t - sigma_t * v: its first three latent channels,
        normalised per image, at latent resolution."""
        from deployments.families.flux import normalised_rgb

        if run.noise_pred is None or not rows:
            return []
        index = list(rows)
        sigma = run.scheduler.sigmas[run.step_index].to(run.latents.device, torch.float32)
        x0 = run.latents[index].float() - sigma * run.noise_pred[index].float()
        return normalised_rgb(x0)

    def finish(self, run: "SD3Run") -> torch.Tensor:
        return run.latents.cpu()

    @torch.no_grad()
    def prepare_rows(self, inputs: DenoiseInputs) -> list["SD3Row"]:
        """`prepare` for one request, kept as one `SD3Row` per image, each with its own fresh
        scheduler: rows of different requests (step counts, guidance with or without CFG,
        progress) can then share `forward_rows` calls while their sizes match."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if self.parallel is not None:
            raise NotImplementedError("SD3 rows do not run with CFG parallelism")
        sampling = inputs.sampling
        run = self.prepare(inputs)
        rows = []
        for i in range(run.rows):
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
            timesteps, steps = self.schedule(scheduler, run.latents, sampling.num_inference_steps)
            rows.append(
                SD3Row(
                    scheduler=scheduler,
                    timesteps=timesteps,
                    num_steps=steps,
                    height=sampling.height,
                    width=sampling.width,
                    guidance_scale=float(sampling.guidance_scale),
                    key=next(self._row_keys),
                    **row_tensors(run, SD3Row.TENSORS, i),
                )
            )
        return rows

    @torch.no_grad()
    def forward_rows(self, rows: Sequence["SD3Row"]) -> None:
        """One iteration of `StableDiffusion3Pipeline.__call__`'s loop for every row, in one
        transformer call: each row at its own timestep, a row with CFG as two transformer rows
        (unconditional and conditional) combined with its own guidance scale, then each row
        advanced by its own scheduler. Rows must share height and width."""
        if not rows:
            return
        check_rows(rows, self)
        t = [r.timesteps[r.step_index] for r in rows]

        def branch(t, embeds, pooled):  # what a branch's transformer row is given, besides latents
            return {"timestep": t[None], "encoder_hidden_states": embeds, "pooled_projections": pooled}

        def forward(hidden_states, batched):
            batched = {"hidden_states": hidden_states, **batched}
            return padded_call(self.transformer, self.buckets, batched, joint_attention_kwargs=None)

        with cache_context(self.transformer):
            noise_preds = guided_rows(
                forward,
                [r.latents for r in rows],
                [branch(ti, r.prompt_embeds, r.pooled_prompt_embeds) for r, ti in zip(rows, t)],
                [
                    branch(ti, r.negative_prompt_embeds, r.negative_pooled_prompt_embeds)
                    if r.branches == 2
                    else None
                    for r, ti in zip(rows, t)
                ],
                [r.guidance_scale for r in rows],
            )
        for row, ti, noise_pred in zip(rows, t, noise_preds):
            row.latents = row.scheduler.step(noise_pred, ti, row.latents, return_dict=False)[0]
            row.noise_pred = noise_pred  # what `preview` reads
            row.step_index += 1

    def finish_row(self, row: "SD3Row") -> torch.Tensor:
        """The row's latents on the CPU, (1, channels, h, w)."""
        return row.latents.cpu()

    def denoise(self, inputs: DenoiseInputs) -> torch.Tensor:
        run = self.prepare(inputs)
        while run.step_index < run.num_steps:
            self.step(run)
        return self.finish(run)

    def dummy_inputs(self, batch: int, height: int, width: int, steps: int) -> DenoiseInputs:
        """Zero embeddings with guidance on (the family's default), so warm-up runs the CFG path."""
        from deployments.families.specs import family_spec

        config = self.transformer.config
        embeds = torch.zeros(batch, 77 + self.max_sequence_length, config.joint_attention_dim)
        pooled = torch.zeros(batch, config.pooled_projection_dim)
        return DenoiseInputs(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            negative_prompt_embeds=embeds.clone(),
            negative_pooled_prompt_embeds=pooled.clone(),
            sampling=SamplingParams(
                height, width, steps, family_spec("sd3").default_guidance_scale, tuple(range(batch))
            ),
        )


@dataclass
class SD3Run:
    """An SD3 batch between steps: its scheduler, timesteps and the tensors of its rows."""

    scheduler: Any
    timesteps: torch.Tensor
    num_steps: int
    guidance_scale: float
    latents: torch.Tensor  # (rows, channels, h, w)
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    negative_prompt_embeds: Optional[torch.Tensor]
    negative_pooled_prompt_embeds: Optional[torch.Tensor]
    noise_pred: Optional[torch.Tensor] = None
    step_index: int = 0

    ROW_FIELDS = (
        "latents",
        "prompt_embeds",
        "pooled_prompt_embeds",
        "negative_prompt_embeds",
        "negative_pooled_prompt_embeds",
        "noise_pred",
    )

    @property
    def rows(self) -> int:
        return self.latents.shape[0]

    def keep(self, rows: Sequence[int]) -> None:
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.latents.device)
        for name in self.ROW_FIELDS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, index))


@dataclass(eq=False)
class SD3Row:
    """One image between steps, for step-level batching: its own scheduler, timesteps and guidance,
    and its tensors (batch dimension 1; the negative ones None without CFG)."""

    TENSORS: ClassVar[tuple[str, ...]] = (
        "latents",
        "prompt_embeds",
        "pooled_prompt_embeds",
        "negative_prompt_embeds",
        "negative_pooled_prompt_embeds",
    )

    scheduler: Any
    timesteps: torch.Tensor
    num_steps: int
    height: int
    width: int
    guidance_scale: float
    latents: torch.Tensor  # (1, channels, h, w)
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    negative_prompt_embeds: Optional[torch.Tensor]
    negative_pooled_prompt_embeds: Optional[torch.Tensor]
    key: int  # unique among the rows of one Denoising
    noise_pred: Optional[torch.Tensor] = None  # the last call's, for `preview`
    step_index: int = 0

    @property
    def done(self) -> bool:
        return self.step_index >= self.num_steps

    @property
    def branches(self) -> int:
        """Transformer rows it takes per call: 2 with classifier-free guidance, else 1."""
        return 1 if self.negative_prompt_embeds is None else 2


class Decoding:
    """The 16-channel VAE: undo the latent scaling and shift, decode, postprocess to PIL."""

    def __init__(self, load: LoadSpec):
        from diffusers import AutoencoderKL
        from diffusers.image_processor import VaeImageProcessor

        self.device = torch.device(load.device)
        self.vae = AutoencoderKL.from_pretrained(
            load.path, subfolder="vae", dtype=torch_dtype(load.dtype)
        ).to(self.device).eval()
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, height: int, width: int):
        config = self.vae.config
        latents = (latents.to(self.device, self.vae.dtype) / config.scaling_factor) + config.shift_factor
        image = self.vae.decode(latents, return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type="pil")
