"""FLUX.1 in three roles, built on diffusers' own FluxPipeline components and methods.

For one checkpoint, seed and settings the three roles chained give the image
`FluxPipeline.__call__` gives in-process: tokenization and encoding follow
`FluxPipeline._get_clip_prompt_embeds` / `_get_t5_prompt_embeds` (diffusers 0.42.1), denoising
follows `FluxPipeline.__call__` step by step (its set-up, then one loop iteration per `step`, with
embeddings in and latents out, a fresh scheduler per batch, one CPU `torch.Generator` per image),
and decoding follows the tail of `FluxPipeline.__call__`.
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
from deployments.families.rows import check_rows, row_tensors
from deployments.families.speed import apply_speed_knobs, cache_context, new_run, padded_call
from deployments.sampling import SamplingParams


def vae_scale_factor(path: str) -> int:
    """Read from the checkpoint's VAE config (a pipeline built without a VAE assumes 8)."""
    from diffusers import AutoencoderKL

    config = AutoencoderKL.load_config(path, subfolder="vae")
    return 2 ** (len(config["block_out_channels"]) - 1)


def speed_up(transformer, load: LoadSpec) -> None:
    """The denoiser's speed knobs on a FLUX transformer (ours, or a FluxPipeline's)."""
    apply_speed_knobs(transformer, load, [*transformer.transformer_blocks, *transformer.single_transformer_blocks])


def t5_tokens(tokenizer, prompts: list[str], limit: int):
    """(padded ids and attention mask, each prompt's token count) in one T5 pass: untruncated ids
    give each prompt's length (specials included); padding them to `limit` is what the pipelines'
    padding="max_length", truncation=True call produces for every prompt that fits. Longer prompts
    are cut only to keep the tensor rectangular: the text encoder stage refuses them by their count
    and never encodes them."""
    untruncated = tokenizer(prompts).input_ids
    padded = tokenizer.pad(
        {"input_ids": [ids[:limit] for ids in untruncated]},
        padding="max_length",
        max_length=limit,
        return_attention_mask=True,
        return_tensors="pt",
    )
    return padded, tuple(len(ids) for ids in untruncated)


def normalised_rgb(latents: torch.Tensor) -> list[np.ndarray]:
    """A preview from predicted clean latents (rows, channels, h, w): their first three channels,
    each image stretched to 0-255, as uint8 (h, w, 3) at latent resolution."""
    rgb = latents[:, :3].float()
    low = rgb.amin(dim=(1, 2, 3), keepdim=True)
    high = rgb.amax(dim=(1, 2, 3), keepdim=True)
    rgb = ((rgb - low) / (high - low).clamp_min(1e-6) * 255).round().to(torch.uint8)
    return [im.permute(1, 2, 0).cpu().numpy() for im in rgb]


class TextEncoding:
    """CLIP-L (pooled) + T5 (sequence). Owns its tokenizers: never share one across threads."""

    def __init__(self, load: LoadSpec):
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        dtype = torch_dtype(load.dtype)
        self.device = torch.device(load.device)
        self.max_sequence_length = load.max_sequence_length
        self.tokenizer = CLIPTokenizer.from_pretrained(load.path, subfolder="tokenizer")
        self.tokenizer_2 = T5TokenizerFast.from_pretrained(load.path, subfolder="tokenizer_2")
        self.text_encoder = CLIPTextModel.from_pretrained(
            load.path, subfolder="text_encoder", dtype=dtype
        ).to(self.device).eval()
        self.text_encoder_2 = T5EncoderModel.from_pretrained(
            load.path, subfolder="text_encoder_2", dtype=dtype
        ).to(self.device).eval()
        self.clip_max_length = self.tokenizer.model_max_length

    def tokenize(self, prompts: list[str]) -> TokenizedPrompts:
        clip_ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.clip_max_length,
            truncation=True,
            return_overflowing_tokens=False,
            return_length=False,
            return_tensors="pt",
        ).input_ids
        t5, counts = t5_tokens(self.tokenizer_2, prompts, self.max_sequence_length)
        return TokenizedPrompts(input_ids=(clip_ids, t5.input_ids), token_counts=counts)

    @torch.no_grad()
    def encode_prompt(self, tokens: TokenizedPrompts) -> EncodedPrompts:
        clip_ids, t5_ids = tokens.input_ids
        pooled = self.text_encoder(clip_ids.to(self.device), output_hidden_states=False)
        pooled = pooled.pooler_output.to(dtype=self.text_encoder.dtype)
        embeds = self.text_encoder_2(t5_ids.to(self.device), output_hidden_states=False)[0]
        embeds = embeds.to(dtype=self.text_encoder_2.dtype)
        return EncodedPrompts(prompt_embeds=embeds, pooled_prompt_embeds=pooled)


class Denoising:
    """The FLUX transformer inside a plain FluxPipeline with no VAE or text encoders.

    With a `ParallelContext` the transformer is xfuser's `xFuserFlux1Transformer2DWrapper`
    (Ulysses/ring attention over the group; every rank computes and returns the full latents) and
    xfuser's runtime state is told each call's shape before the call.
    """

    def __init__(self, load: LoadSpec, parallel: Optional[ParallelContext] = None):
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

        self.device = torch.device(load.device)
        self.parallel = parallel
        self.max_sequence_length = load.max_sequence_length
        transformer_cls = FluxTransformer2DModel
        if parallel is not None:
            from xfuser.model_executor.models.transformers.transformer_flux import (
                xFuserFlux1Transformer2DWrapper as transformer_cls,
            )

            heads = transformer_cls.load_config(load.path, subfolder="transformer")[
                "num_attention_heads"
            ]
            if heads % parallel.ulysses_degree:
                raise ValueError(
                    f"ulysses_degree {parallel.ulysses_degree} must divide the transformer's"
                    f" {heads} attention heads"
                )
        self.transformer = transformer_cls.from_pretrained(
            load.path, subfolder="transformer", dtype=torch_dtype(load.dtype)
        ).to(self.device).eval()
        self.buckets = load.batch_buckets
        speed_up(self.transformer, load)
        self.scheduler_config = FlowMatchEulerDiscreteScheduler.load_config(
            load.path, subfolder="scheduler"
        )
        self.vae_scale_factor = vae_scale_factor(load.path)
        self.rows_forwarded: tuple[int, ...] = ()  # keys of the rows in the last `forward_rows`
        self._row_keys = count()  # each FluxRow's key, unique for this Denoising (unlike id())
        if parallel is not None:
            from xfuser.core.distributed.runtime_state import initialize_runtime_state

            initialize_runtime_state(self.pipeline(), parallel.engine_config)

    def pipeline(self):
        """A pipeline for one call: shares the transformer, owns a fresh scheduler (a shared one
        races on `set_timesteps` when calls overlap)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config),
            vae=None,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            transformer=self.transformer,
        )
        pipe.vae_scale_factor = self.vae_scale_factor
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def schedule(self, scheduler, image_seq_len: int, steps: int) -> tuple[torch.Tensor, int]:
        """`FluxPipeline.__call__`'s timesteps for an image of `image_seq_len` tokens, set on
        `scheduler` (its sigmas, resolution shift `mu`, then `set_begin_index(0)`)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        sigmas = np.linspace(1.0, 1 / steps, steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        config = scheduler.config
        mu = calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        timesteps, steps = retrieve_timesteps(scheduler, steps, self.device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        return timesteps, steps

    @torch.no_grad()
    def prepare(self, inputs: DenoiseInputs) -> "FluxRun":
        """`FluxPipeline.__call__` up to its denoising loop, with embeddings given."""
        sampling = inputs.sampling
        rows = sampling.n
        if self.parallel is not None:
            from xfuser.core.distributed.runtime_state import get_runtime_state

            get_runtime_state().set_input_parameters(
                height=sampling.height,
                width=sampling.width,
                batch_size=rows,
                num_inference_steps=sampling.num_inference_steps,
                max_condition_sequence_length=inputs.prompt_embeds.shape[1],
                split_text_embed_in_sp=True,
            )
        pipe = self.pipeline()
        dtype = self.transformer.dtype
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(
            prompt=None,
            prompt_2=None,
            prompt_embeds=inputs.prompt_embeds.to(self.device, dtype),
            pooled_prompt_embeds=inputs.pooled_prompt_embeds.to(self.device, dtype),
            device=self.device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        latents, image_ids = pipe.prepare_latents(
            rows,
            self.transformer.config.in_channels // 4,
            sampling.height,
            sampling.width,
            prompt_embeds.dtype,
            self.device,
            [torch.Generator("cpu").manual_seed(s) for s in sampling.seeds],
            None,
        )
        timesteps, steps = self.schedule(pipe.scheduler, latents.shape[1], sampling.num_inference_steps)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([1], sampling.guidance_scale, device=self.device, dtype=torch.float32)
            guidance = guidance.expand(latents.shape[0])
        new_run(self.transformer)
        return FluxRun(
            scheduler=pipe.scheduler,
            timesteps=timesteps,
            num_steps=steps,
            height=sampling.height,
            width=sampling.width,
            latents=latents,
            image_ids=image_ids,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled,
            text_ids=text_ids,
            guidance=guidance,
        )

    @torch.no_grad()
    def step(self, run: "FluxRun", keep: Optional[Sequence[int]] = None) -> None:
        """One iteration of `FluxPipeline.__call__`'s loop (no true CFG, no IP-adapter)."""
        if keep is not None:
            run.keep(keep)
            new_run(self.transformer)
        t = run.timesteps[run.step_index]
        latents = run.latents
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        with cache_context(self.transformer):
            noise_pred = padded_call(
                self.transformer,
                self.buckets,
                {
                    "hidden_states": latents,
                    "timestep": timestep / 1000,
                    "guidance": run.guidance,
                    "pooled_projections": run.pooled_prompt_embeds,
                    "encoder_hidden_states": run.prompt_embeds,
                },
                txt_ids=run.text_ids,
                img_ids=run.image_ids,
                joint_attention_kwargs={},
            )
        run.latents = run.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        run.noise_pred = noise_pred
        run.step_index += 1

    @torch.no_grad()
    def preview(self, run: "FluxRun", rows: Sequence[int]) -> list[np.ndarray]:
        """Flow matching predicts x0 = x_t - sigma_t * v: its first three latent channels,
        normalised per image, at latent resolution."""
        from diffusers import FluxPipeline

        if run.noise_pred is None or not rows:
            return []
        index = list(rows)
        sigma = run.scheduler.sigmas[run.step_index].to(run.latents.device, torch.float32)
        x0 = run.latents[index].float() - sigma * run.noise_pred[index].float()
        x0 = FluxPipeline._unpack_latents(x0, run.height, run.width, self.vae_scale_factor)
        return normalised_rgb(x0)

    def finish(self, run: "FluxRun") -> torch.Tensor:
        return run.latents.cpu()

    @torch.no_grad()
    def prepare_rows(self, inputs: DenoiseInputs) -> list["FluxRow"]:
        """`prepare` for one request, kept as one `FluxRow` per image, each with its own fresh
        scheduler: rows of different requests (step counts, guidance, progress) can then share
        `forward_rows` calls while their sizes match."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        run = self.prepare(inputs)
        rows = []
        for i in range(run.rows):
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
            timesteps, steps = self.schedule(scheduler, run.latents.shape[1], run.num_steps)
            rows.append(
                FluxRow(
                    scheduler=scheduler,
                    timesteps=timesteps,
                    num_steps=steps,
                    height=run.height,
                    width=run.width,
                    guidance=float(inputs.sampling.guidance_scale),
                    image_ids=run.image_ids,
                    text_ids=run.text_ids,
                    key=next(self._row_keys),
                    **row_tensors(run, FluxRow.TENSORS, i),
                )
            )
        return rows

    @torch.no_grad()
    def forward_rows(self, rows: Sequence["FluxRow"]) -> None:
        """One iteration of `FluxPipeline.__call__`'s loop for every row, in one transformer call:
        each row at its own timestep with its own guidance, then advanced by its own scheduler.
        Rows must share height and width."""
        if not rows:
            return
        check_rows(rows, self)
        if self.parallel is not None:  # xfuser splits this call's sequence over the group
            from xfuser.core.distributed.runtime_state import get_runtime_state

            get_runtime_state().set_input_parameters(
                height=rows[0].height,
                width=rows[0].width,
                batch_size=len(rows),
                num_inference_steps=max(r.num_steps for r in rows),
                max_condition_sequence_length=rows[0].prompt_embeds.shape[1],
                split_text_embed_in_sp=True,
            )
        t = torch.stack([r.timesteps[r.step_index] for r in rows])
        latents = torch.cat([r.latents for r in rows])
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.tensor([r.guidance for r in rows], device=self.device, dtype=torch.float32)
        with cache_context(self.transformer):
            noise_pred = padded_call(
                self.transformer,
                self.buckets,
                {
                    "hidden_states": latents,
                    "timestep": t.to(latents.dtype) / 1000,
                    "guidance": guidance,
                    "pooled_projections": torch.cat([r.pooled_prompt_embeds for r in rows]),
                    "encoder_hidden_states": torch.cat([r.prompt_embeds for r in rows]),
                },
                txt_ids=rows[0].text_ids,
                img_ids=rows[0].image_ids,
                joint_attention_kwargs={},
            )
        for i, row in enumerate(rows):
            row.latents = row.scheduler.step(noise_pred[i : i + 1], t[i], row.latents, return_dict=False)[0]
            row.noise_pred = noise_pred[i : i + 1]  # what `preview` reads
            row.step_index += 1

    def finish_row(self, row: "FluxRow") -> torch.Tensor:
        """The row's latents on the CPU, (1, tokens, channels)."""
        return row.latents.cpu()

    def denoise(self, inputs: DenoiseInputs) -> torch.Tensor:
        run = self.prepare(inputs)
        while run.step_index < run.num_steps:
            self.step(run)
        return self.finish(run)

    def dummy_inputs(self, batch: int, height: int, width: int, steps: int) -> DenoiseInputs:
        config = self.transformer.config
        return DenoiseInputs(
            prompt_embeds=torch.zeros(batch, self.max_sequence_length, config.joint_attention_dim),
            pooled_prompt_embeds=torch.zeros(batch, config.pooled_projection_dim),
            sampling=SamplingParams(height, width, steps, 3.5, tuple(range(batch))),
        )


@dataclass
class FluxRun:
    """A FLUX batch between steps: its scheduler, timesteps and the tensors of its rows."""

    scheduler: Any
    timesteps: torch.Tensor
    num_steps: int
    height: int
    width: int
    latents: torch.Tensor  # packed, (rows, tokens, channels)
    image_ids: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    text_ids: torch.Tensor
    guidance: Optional[torch.Tensor]
    noise_pred: Optional[torch.Tensor] = None
    step_index: int = 0

    @property
    def rows(self) -> int:
        return self.latents.shape[0]

    def keep(self, rows: Sequence[int]) -> None:
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.latents.device)
        self.latents = self.latents.index_select(0, index)
        self.prompt_embeds = self.prompt_embeds.index_select(0, index)
        self.pooled_prompt_embeds = self.pooled_prompt_embeds.index_select(0, index)
        if self.guidance is not None:
            self.guidance = self.guidance.index_select(0, index)
        if self.noise_pred is not None:
            self.noise_pred = self.noise_pred.index_select(0, index)


@dataclass(eq=False)
class FluxRow:
    """One image between steps, for step-level batching: its own scheduler, timesteps and guidance,
    and its tensors (batch dimension 1)."""

    TENSORS: ClassVar[tuple[str, ...]] = ("latents", "prompt_embeds", "pooled_prompt_embeds")

    scheduler: Any
    timesteps: torch.Tensor
    num_steps: int
    height: int
    width: int
    guidance: float
    latents: torch.Tensor  # packed, (1, tokens, channels)
    image_ids: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    text_ids: torch.Tensor
    key: int  # unique among the rows of one Denoising
    noise_pred: Optional[torch.Tensor] = None  # the last call's, for `preview`
    step_index: int = 0

    @property
    def done(self) -> bool:
        return self.step_index >= self.num_steps


class Decoding:
    """The VAE: unpack FLUX latents, undo the latent scaling, decode, postprocess to PIL."""

    def __init__(self, load: LoadSpec):
        from diffusers import AutoencoderKL
        from diffusers.image_processor import VaeImageProcessor

        self.device = torch.device(load.device)
        self.vae = AutoencoderKL.from_pretrained(
            load.path, subfolder="vae", dtype=torch_dtype(load.dtype)
        ).to(self.device).eval()
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, height: int, width: int):
        from diffusers import FluxPipeline

        latents = FluxPipeline._unpack_latents(latents, height, width, self.vae_scale_factor)
        config = self.vae.config
        latents = (latents / config.scaling_factor) + config.shift_factor
        image = self.vae.decode(latents.to(self.device, self.vae.dtype), return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type="pil")
