"""What crosses between stages: frozen dataclasses of CPU tensors, shapes, seeds and request ids.

Every payload belongs to exactly one request. Tensors in a payload are that request's rows only
(cloned out of the batch, so pickling one never ships another request's data) and live on the CPU
(a pickled CUDA tensor would land on a device index that may not exist in the next process).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from deployments.sampling import SamplingParams

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class StageTrace:
    """How one stage handled a request: the size of the batch it ran in and the batch's seconds."""

    stage: str
    batch_size: int
    seconds: float


@dataclass(frozen=True)
class GenerationSpec:
    """Everything about a request the denoiser and decoder need, besides the prompt embeddings."""

    request_id: str  # the job id: the key of the request's record, events and cancel flag
    sampling: SamplingParams
    model: str = ""  # the served model (its name in the config) whose stages run the request
    output_format: str = "png"
    output_compression: Optional[int] = None
    partial_images: int = 0  # previews of image 0 the denoiser emits along the way (0-3)
    # Step-level batching (`deployments.step_scheduler`) orders, pauses and refuses by these:
    priority: int = 0  # the request's priority (higher first)
    deadline_at: Optional[float] = None  # wall clock (time.time()) by which it must end, if any

    @property
    def n(self) -> int:
        return self.sampling.n


@dataclass(frozen=True)
class EncodeRequest:
    request_id: str
    prompt: str
    # With classifier-free guidance, the prompt of the unconditional branch ("" when the request
    # gave none, as diffusers does); None when the request runs without it.
    negative_prompt: Optional[str] = None
    # When the payload became ready for the stage that takes it (wall clock, stamped as it is
    # made: the stage before made it then; the ingress restamps an encode request as it sends it).
    # That stage's queue wait runs from here to the start of its batch (deployments/metrics.py).
    ready_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class PromptEmbeddings:
    """One prompt's embeddings, named as diffusers' pipelines name their keyword arguments."""

    request_id: str
    prompt_embeds: "torch.Tensor"  # (1, seq, dim)
    pooled_prompt_embeds: Optional["torch.Tensor"] = None  # (1, dim)
    input_ids: tuple["torch.Tensor", ...] = ()  # per tokenizer, (seq,) as fed to its encoder
    prompt_attention_mask: Optional["torch.Tensor"] = None  # (1, seq), families that use one
    # The negative prompt's, when the request runs with classifier-free guidance.
    negative_prompt_embeds: Optional["torch.Tensor"] = None
    negative_pooled_prompt_embeds: Optional["torch.Tensor"] = None
    negative_prompt_attention_mask: Optional["torch.Tensor"] = None
    trace: tuple[StageTrace, ...] = field(default=())
    ready_at: float = field(default_factory=time.time)  # see EncodeRequest


@dataclass(frozen=True)
class Latents:
    """A request's denoised latents (n, ...) in the family's own layout (packed for FLUX)."""

    spec: GenerationSpec
    latents: "torch.Tensor"
    trace: tuple[StageTrace, ...] = field(default=())
    ready_at: float = field(default_factory=time.time)  # see EncodeRequest

    @property
    def request_id(self) -> str:
        return self.spec.request_id


@dataclass(frozen=True)
class EncodedImages:
    """A request's images, encoded (png/jpeg/webp bytes), in seed order."""

    request_id: str
    images: tuple[bytes, ...]
    output_format: str
    width: int
    height: int
    trace: tuple[StageTrace, ...] = field(default=())


@dataclass(frozen=True)
class Rejected:
    """A request a stage refused for a client reason (e.g. a prompt over the token limit).

    It travels down the DAG as a value instead of an exception: the later stages pass it on
    untouched and the ingress turns `error` into its 4xx, with no traceback logged for a client
    mistake. Server-side failures are raised instead.
    """

    request_id: str
    error: Exception


@dataclass(frozen=True)
class Cancelled:
    """A request a stage stopped (or never started) because it was cancelled: travels down the DAG
    as a value, like `Rejected`, so the dispatcher ends the job `cancelled`."""

    request_id: str
    stage: str
    steps_done: int = 0  # denoising steps the request ran before it stopped


def passes_through(value) -> bool:
    """A value later stages hand on untouched: the request ended before reaching them."""
    return isinstance(value, (Rejected, Cancelled))
