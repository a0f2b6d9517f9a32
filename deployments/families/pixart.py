"""PixArt-Sigma in three roles, built on diffusers' own PixArtSigmaPipeline.

For one checkpoint, seed and settings the three roles chained give the image
`PixArtSigmaPipeline.__call__(..., clean_caption=False, use_resolution_binning=False)` gives
in-process (diffusers 0.42.1): encoding follows its `encode_prompt` (T5, max_length padding to
max_sequence_length, the attention mask kept; negative prompts encoded the same way), denoising
follows `__call__` step by step (a fresh scheduler per batch, one CPU `torch.Generator` per image,
classifier-free guidance through `guidance.guided_prediction`, the learned-sigma channels dropped),
decoding follows its tail. Captions are not cleaned (the pipeline's `clean_caption` needs bs4 and
ftfy): they are lower-cased and stripped, as the pipeline does without cleaning. The size asked is
generated as is (no resolution binning).

PixArt-Sigma's DPM-Solver++ is a multistep scheduler: it keeps each row's last model outputs
between steps, so dropping rows (`PixArtRun.keep`) drops theirs from the scheduler too. For
step-level batching each image is a `PixArtRow` with a scheduler of its own (`prepare_rows`), so rows
at different steps, with different step counts and guidance, share `forward_rows` calls.

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


def caption(text: str) -> str:
    """`PixArtSigmaPipeline._text_preprocessing(text, clean_caption=False)`."""
    return text.lower().strip()


class TextEncoding:
    """T5 (sequence + attention mask). Owns its tokenizer."""

    def __init__(self, load: LoadSpec):
        from transformers import T5EncoderModel, T5TokenizerFast

        self.device = torch.device(load.device)
        self.max_sequence_length = load.max_sequence_length
        self.tokenizer = T5TokenizerFast.from_pretrained(load.path, subfolder="tokenizer")
        self.text_encoder = T5EncoderModel.from_pretrained(
            load.path, subfolder="text_encoder", dtype=torch_dtype(load.dtype)
        ).to(self.device).eval()

    def tokenize(self, prompts: list[str]) -> TokenizedPrompts:
        padded, counts = t5_tokens(self.tokenizer, [caption(p) for p in prompts], self.max_sequence_length)
        return TokenizedPrompts(input_ids=(padded.input_ids, padded.attention_mask), token_counts=counts)

    @torch.no_grad()
    def encode_prompt(self, tokens: TokenizedPrompts) -> EncodedPrompts:
        ids, mask = tokens.input_ids
        mask = mask.to(self.device)
        embeds = self.text_encoder(ids.to(self.device), attention_mask=mask)[0]
        return EncodedPrompts(
            prompt_embeds=embeds.to(dtype=self.text_encoder.dtype),
            pooled_prompt_embeds=None,
            prompt_attention_mask=mask,
        )


class Denoising:
    """The PixArt transformer inside a PixArtSigmaPipeline with no VAE or text encoder."""

    def __init__(self, load: LoadSpec, parallel: Optional[ParallelContext] = None):
        from diffusers import PixArtTransformer2DModel

        from deployments.families.flux import vae_scale_factor

        if parallel is not None and parallel.sp_degree > 1:
            raise ValueError("pixart: sequence parallelism (ulysses/ring) is not supported; use cfg_degree")
        self.device = torch.device(load.device)
        self.parallel = parallel
        self.max_sequence_length = load.max_sequence_length
        self.transformer = PixArtTransformer2DModel.from_pretrained(
            load.path, subfolder="transformer", dtype=torch_dtype(load.dtype)
        ).to(self.device).eval()
        self.buckets = load.batch_buckets
        apply_speed_knobs(self.transformer, load, self.transformer.transformer_blocks)
        self.scheduler_path = load.path
        self.scheduler_config = _scheduler_class(load.path).load_config(load.path, subfolder="scheduler")
        self.vae_scale_factor = vae_scale_factor(load.path)
        self.rows_forwarded: tuple[int, ...] = ()  # keys of the rows in the last `forward_rows`
        self._row_keys = count()  # each PixArtRow's key, unique for this Denoising (unlike id())
        if parallel is not None:  # xDiT's groups (the CFG group) for this rank
            from xfuser.core.distributed.runtime_state import initialize_runtime_state

            initialize_runtime_state(self.pipeline(), parallel.engine_config)

    def pipeline(self):
        """A pipeline for one batch: shares the transformer, owns a fresh scheduler."""
        from diffusers import PixArtSigmaPipeline

        pipe = PixArtSigmaPipeline(
            tokenizer=None,
            text_encoder=None,
            vae=None,
            transformer=self.transformer,
            scheduler=_scheduler_class(self.scheduler_path).from_config(self.scheduler_config),
        )
        pipe.vae_scale_factor = self.vae_scale_factor
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def schedule(self, scheduler, steps: int) -> tuple[torch.Tensor, int]:
        """`PixArtSigmaPipeline.__call__`'s timesteps, set on `scheduler`."""
        from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import retrieve_timesteps

        return retrieve_timesteps(scheduler, steps, self.device)

    @torch.no_grad()
    def prepare(self, inputs: DenoiseInputs) -> "PixArtRun":
        """`PixArtSigmaPipeline.__call__` up to its denoising loop, with embeddings given."""
        sampling = inputs.sampling
        pipe = self.pipeline()
        dtype = self.transformer.dtype
        timesteps, steps = self.schedule(pipe.scheduler, sampling.num_inference_steps)
        generators = [torch.Generator("cpu").manual_seed(s) for s in sampling.seeds]
        latents = pipe.prepare_latents(
            sampling.n,
            self.transformer.config.in_channels,
            sampling.height,
            sampling.width,
            dtype,
            self.device,
            generators,
        )

        def rows(tensor, as_dtype=dtype):
            return None if tensor is None else tensor.to(self.device, as_dtype)

        new_run(self.transformer)
        return PixArtRun(
            scheduler=pipe.scheduler,
            step_kwargs=pipe.prepare_extra_step_kwargs(generators, 0.0),
            timesteps=timesteps,
            num_steps=steps,
            guidance_scale=sampling.guidance_scale,
            latents=latents,
            prompt_embeds=rows(inputs.prompt_embeds),
            prompt_attention_mask=rows(inputs.prompt_attention_mask, torch.long),
            negative_prompt_embeds=rows(inputs.negative_prompt_embeds),
            negative_prompt_attention_mask=rows(inputs.negative_prompt_attention_mask, torch.long),
        )

    def _learned_sigma(self, latents: torch.Tensor) -> bool:
        """Whether the transformer also predicts the variance (out_channels = 2 x latent channels):
        the pipeline then keeps the first half of its channels, the noise."""
        return self.transformer.config.out_channels // 2 == latents.shape[1]

    def _forward(self, run: "PixArtRun", t):
        def forward(hidden_states, branch):
            hidden_states = run.scheduler.scale_model_input(hidden_states, t)
            return padded_call(
                self.transformer,
                self.buckets,
                {
                    "hidden_states": hidden_states,
                    "encoder_hidden_states": branch["encoder_hidden_states"],
                    "encoder_attention_mask": branch["encoder_attention_mask"],
                    "timestep": t[None].to(hidden_states.device).expand(hidden_states.shape[0]),
                },
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            )

        return forward

    @torch.no_grad()
    def step(self, run: "PixArtRun", keep: Optional[Sequence[int]] = None) -> None:
        """One iteration of `PixArtSigmaPipeline.__call__`'s loop."""
        if keep is not None:
            run.keep(keep)
            new_run(self.transformer)
        t = run.timesteps[run.step_index]
        cond = {"encoder_hidden_states": run.prompt_embeds, "encoder_attention_mask": run.prompt_attention_mask}
        uncond = None
        if run.negative_prompt_embeds is not None:
            uncond = {
                "encoder_hidden_states": run.negative_prompt_embeds,
                "encoder_attention_mask": run.negative_prompt_attention_mask,
            }
        with cache_context(self.transformer):
            noise_pred = guided_prediction(
                self._forward(run, t), run.latents, cond, uncond, run.guidance_scale, self.parallel
            )
        if self._learned_sigma(run.latents):
            noise_pred = noise_pred.chunk(2, dim=1)[0]
        run.latents = run.scheduler.step(noise_pred, t, run.latents, **run.step_kwargs, return_dict=False)[0]
        run.step_index += 1

    @torch.no_grad()
    def preview(self, run: "PixArtRun", rows: Sequence[int]) -> list[np.ndarray]:
        """The scheduler's own prediction of the clean latents at the last step (DPM-Solver++ keeps
        it as its last model output): first three channels, normalised, at latent resolution."""
        from deployments.families.flux import normalised_rgb

        outputs = getattr(run.scheduler, "model_outputs", None)
        if not outputs or outputs[-1] is None or not rows:
            return []
        return normalised_rgb(outputs[-1][list(rows)])

    def finish(self, run: "PixArtRun") -> torch.Tensor:
        return run.latents.cpu()

    @torch.no_grad()
    def prepare_rows(self, inputs: DenoiseInputs) -> list["PixArtRow"]:
        """`prepare` for one request, kept as one `PixArtRow` per image, each with its own fresh
        scheduler (DPM-Solver++ keeps a run's last model outputs: a row's history is its own) and
        its own generator: rows of different requests (step counts, guidance with or without CFG,
        progress) can then share `forward_rows` calls while their sizes match."""
        if self.parallel is not None:
            raise NotImplementedError("PixArt rows do not run with CFG parallelism")
        sampling = inputs.sampling
        run = self.prepare(inputs)
        rows = []
        for i in range(run.rows):
            scheduler = _scheduler_class(self.scheduler_path).from_config(self.scheduler_config)
            timesteps, steps = self.schedule(scheduler, sampling.num_inference_steps)
            step_kwargs = dict(run.step_kwargs)
            if isinstance(step_kwargs.get("generator"), list):
                step_kwargs["generator"] = step_kwargs["generator"][i : i + 1]

            rows.append(
                PixArtRow(
                    scheduler=scheduler,
                    step_kwargs=step_kwargs,
                    timesteps=timesteps,
                    num_steps=steps,
                    height=sampling.height,
                    width=sampling.width,
                    guidance_scale=float(sampling.guidance_scale),
                    key=next(self._row_keys),
                    **row_tensors(run, PixArtRow.TENSORS, i),
                )
            )
        return rows

    @torch.no_grad()
    def forward_rows(self, rows: Sequence["PixArtRow"]) -> None:
        """One iteration of `PixArtSigmaPipeline.__call__`'s loop for every row, in one transformer
        call: each row's latents scaled by its own scheduler, at its own timestep with its own
        attention masks, a row with CFG as two transformer rows (unconditional and conditional)
        combined with its own guidance scale, the learned-sigma channels dropped, then each row
        advanced by its own scheduler. Rows must share height and width."""
        if not rows:
            return
        check_rows(rows, self)
        t = [r.timesteps[r.step_index] for r in rows]
        hidden = [r.scheduler.scale_model_input(r.latents, ti) for r, ti in zip(rows, t)]

        def branch(t, embeds, mask):  # what a branch's transformer row is given, besides latents
            return {
                "encoder_hidden_states": embeds,
                "encoder_attention_mask": mask,
                "timestep": t[None].to(self.device),
            }

        def forward(hidden_states, batched):
            return padded_call(
                self.transformer,
                self.buckets,
                {"hidden_states": hidden_states, **batched},
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            )

        with cache_context(self.transformer):
            noise_preds = guided_rows(
                forward,
                hidden,
                [branch(ti, r.prompt_embeds, r.prompt_attention_mask) for r, ti in zip(rows, t)],
                [
                    branch(ti, r.negative_prompt_embeds, r.negative_prompt_attention_mask)
                    if r.branches == 2
                    else None
                    for r, ti in zip(rows, t)
                ],
                [r.guidance_scale for r in rows],
            )
        for row, ti, noise_pred in zip(rows, t, noise_preds):
            if self._learned_sigma(row.latents):
                noise_pred = noise_pred.chunk(2, dim=1)[0]
            row.latents = row.scheduler.step(noise_pred, ti, row.latents, **row.step_kwargs, return_dict=False)[0]
            row.step_index += 1

    def finish_row(self, row: "PixArtRow") -> torch.Tensor:
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

        embeds = torch.zeros(batch, self.max_sequence_length, self.transformer.config.caption_channels)
        mask = torch.ones(batch, self.max_sequence_length, dtype=torch.long)
        return DenoiseInputs(
            prompt_embeds=embeds,
            pooled_prompt_embeds=None,
            prompt_attention_mask=mask,
            negative_prompt_embeds=embeds.clone(),
            negative_prompt_attention_mask=mask.clone(),
            sampling=SamplingParams(
                height, width, steps, family_spec("pixart").default_guidance_scale, tuple(range(batch))
            ),
        )


def _scheduler_class(path: str):
    """The checkpoint's scheduler class (DPMSolverMultistepScheduler for PixArt-Sigma)."""
    import diffusers

    from deployments.families.checkpoint import read_config

    index = read_config(path) or {}
    name = (index.get("scheduler") or ["diffusers", "DPMSolverMultistepScheduler"])[1]
    return getattr(diffusers, name)


@dataclass
class PixArtRun:
    """A PixArt batch between steps: its scheduler (with its per-row history), timesteps and the
    tensors of its rows."""

    scheduler: Any
    step_kwargs: dict
    timesteps: torch.Tensor
    num_steps: int
    guidance_scale: float
    latents: torch.Tensor  # (rows, channels, h, w)
    prompt_embeds: torch.Tensor
    prompt_attention_mask: torch.Tensor
    negative_prompt_embeds: Optional[torch.Tensor]
    negative_prompt_attention_mask: Optional[torch.Tensor]
    step_index: int = 0

    ROW_FIELDS = (
        "latents",
        "prompt_embeds",
        "prompt_attention_mask",
        "negative_prompt_embeds",
        "negative_prompt_attention_mask",
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
        outputs = getattr(self.scheduler, "model_outputs", None)
        if outputs is not None:
            self.scheduler.model_outputs = [
                o.index_select(0, index) if torch.is_tensor(o) else o for o in outputs
            ]
        generator = self.step_kwargs.get("generator")
        if isinstance(generator, list):
            self.step_kwargs = {**self.step_kwargs, "generator": [generator[i] for i in rows]}


@dataclass(eq=False)
class PixArtRow:
    """One image between steps, for step-level batching: its own scheduler (with its own multistep
    history), generator, timesteps and guidance, and its tensors (batch dimension 1; the negative
    ones None without CFG)."""

    TENSORS: ClassVar[tuple[str, ...]] = (
        "latents",
        "prompt_embeds",
        "prompt_attention_mask",
        "negative_prompt_embeds",
        "negative_prompt_attention_mask",
    )

    scheduler: Any
    step_kwargs: dict
    timesteps: torch.Tensor
    num_steps: int
    height: int
    width: int
    guidance_scale: float
    latents: torch.Tensor  # (1, channels, h, w)
    prompt_embeds: torch.Tensor
    prompt_attention_mask: torch.Tensor
    negative_prompt_embeds: Optional[torch.Tensor]
    negative_prompt_attention_mask: Optional[torch.Tensor]
    key: int  # unique among the rows of one Denoising
    step_index: int = 0

    @property
    def done(self) -> bool:
        return self.step_index >= self.num_steps

    @property
    def branches(self) -> int:
        """Transformer rows it takes per call: 2 with classifier-free guidance, else 1."""
        return 1 if self.negative_prompt_embeds is None else 2


class Decoding:
    """The 4-channel VAE: undo the latent scaling, decode, postprocess to PIL."""

    def __init__(self, load: LoadSpec):
        from diffusers import AutoencoderKL
        from diffusers.image_processor import PixArtImageProcessor

        self.device = torch.device(load.device)
        self.vae = AutoencoderKL.from_pretrained(
            load.path, subfolder="vae", dtype=torch_dtype(load.dtype)
        ).to(self.device).eval()
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = PixArtImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, height: int, width: int):
        latents = latents.to(self.device, self.vae.dtype) / self.vae.config.scaling_factor
        image = self.vae.decode(latents, return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type="pil")
