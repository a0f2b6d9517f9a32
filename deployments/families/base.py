"""The protocol a model family implements: three roles, each loading only its own weights.

A family module (e.g. `flux.py`) defines `TextEncoding`, `Denoising` and `Decoding` classes with the
signatures below, in diffusers' vocabulary. Families know nothing of Ray; the deployments know
nothing of a family's internals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Protocol, Sequence

from deployments.sampling import SamplingParams

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image


@dataclass(frozen=True)
class LoadSpec:
    """Where and how a role loads its weights."""

    path: str  # local diffusers folder or hub id (already resolved from builtin:...)
    dtype: str  # "float32" | "bfloat16" | "float16"
    device: str  # "cpu" | "cuda"
    max_sequence_length: int = 512
    # The denoiser's speed knobs (see deployments.families.speed); other roles leave them off.
    compile_blocks: bool = False  # torch.compile each transformer block
    cuda_graphs: bool = False  # compile in reduce-overhead mode
    batch_buckets: tuple[int, ...] = ()  # transformer batches are padded up to one of these
    attention_backend: Optional[str] = None
    quantization: Optional[str] = None  # "fp8"
    step_cache: Optional[dict] = None  # StepCacheConfig as a dict


@dataclass(frozen=True)
class TokenizedPrompts:
    input_ids: tuple["torch.Tensor", ...]  # per tokenizer, (batch, seq)
    # Tokens each prompt needs on the sequence tokenizer, before truncation (specials included).
    token_counts: tuple[int, ...]


@dataclass(frozen=True)
class EncodedPrompts:
    prompt_embeds: "torch.Tensor"  # (batch, seq, dim)
    pooled_prompt_embeds: Optional["torch.Tensor"]  # (batch, dim) or None
    prompt_attention_mask: Optional["torch.Tensor"] = None  # (batch, seq), families that use one


@dataclass(frozen=True)
class DenoiseInputs:
    """One same-key batch for the transformer: rows of embeddings, one seed per row.

    With classifier-free guidance (a family whose spec has `cfg`, and guidance_scale > 1) every
    row also has its negative prompt's embeddings (`negative_*`, the embeddings of "" when the
    request gave none, as diffusers does); without it they are None. Names follow diffusers'
    pipeline keyword arguments."""

    prompt_embeds: "torch.Tensor"
    pooled_prompt_embeds: Optional["torch.Tensor"]
    sampling: SamplingParams  # `seeds`: one per row, in row order
    prompt_attention_mask: Optional["torch.Tensor"] = None
    negative_prompt_embeds: Optional["torch.Tensor"] = None
    negative_pooled_prompt_embeds: Optional["torch.Tensor"] = None
    negative_prompt_attention_mask: Optional["torch.Tensor"] = None

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.negative_prompt_embeds is not None


class DenoiseRun(Protocol):
    """A batch being denoised, owned by the family (latents, scheduler, embeddings of its rows)."""

    step_index: int  # steps done
    num_steps: int
    rows: int  # rows still in the batch


@dataclass(frozen=True)
class ParallelContext:
    """This process's place in a sequence-parallel group, set up by `deployments.sp_runtime`."""

    ulysses_degree: int
    engine_config: Any  # xfuser's EngineConfig
    ring_degree: int = 1
    # 2: classifier-free guidance split over two ranks (the unconditional branch on CFG rank 0,
    # the conditional one on CFG rank 1), each an SP group of ulysses x ring ranks.
    cfg_degree: int = 1

    @property
    def sp_degree(self) -> int:
        return self.ulysses_degree * self.ring_degree


class TextEncoding(Protocol):
    def __init__(self, load: LoadSpec) -> None: ...

    def tokenize(self, prompts: list[str]) -> TokenizedPrompts: ...

    def encode_prompt(self, tokens: TokenizedPrompts) -> EncodedPrompts: ...


class Denoising(Protocol):
    """The transformer loop, one step at a time, so a caller can stop rows between steps.

    `prepare` draws each row's initial noise from its own seed and gives the batch a fresh
    scheduler; `step` first keeps only the listed rows (indices into the current rows; None keeps
    all), then advances every remaining row one step. Rows are independent: a row's result does not
    depend on which rows were dropped. `denoise` runs a batch to the end (warm-up, tests). With a
    `ParallelContext`, one rank of an SP group: every rank must get the same calls with the same
    arguments in the same order, and every rank holds the full latents.
    """

    def __init__(self, load: LoadSpec, parallel: Optional[ParallelContext] = None) -> None: ...

    def prepare(self, inputs: DenoiseInputs) -> DenoiseRun: ...

    def step(self, run: DenoiseRun, keep: Optional[Sequence[int]] = None) -> None: ...

    def preview(self, run: DenoiseRun, rows: Sequence[int]) -> list["np.ndarray"]:
        """A cheap look at the predicted final image of each row: uint8 (h, w, 3) at latent
        resolution, from the latents alone (no VAE)."""
        ...

    def finish(self, run: DenoiseRun) -> "torch.Tensor":
        """The remaining rows' latents, on the CPU."""
        ...

    def denoise(self, inputs: DenoiseInputs) -> "torch.Tensor": ...

    def dummy_inputs(self, batch: int, height: int, width: int, steps: int) -> DenoiseInputs:
        """Inputs of the right shapes for a warm-up call (zero embeddings)."""
        ...


class Decoding(Protocol):
    def __init__(self, load: LoadSpec) -> None: ...

    def decode(self, latents: "torch.Tensor", height: int, width: int) -> list["Image.Image"]: ...


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
