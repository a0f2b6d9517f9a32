"""Typed arguments of a dit-serve application: the `args:` block of a Serve config file.

Every field is described and bounded; unknown keys are rejected, so a typo in a YAML file fails the
deploy with a message that names it instead of being silently ignored. Serve's own per-deployment
options (autoscaling, replica resources, max_ongoing_requests) stay in the config's `deployments:`
block, where Ray Serve users expect them; `build_app` fills in safe defaults for them.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.families.specs import builtin_models, family_names, family_spec

SIZE_RE = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")


def parse_size(size: str) -> tuple[int, int]:
    """(width, height) of a `WxH` size; ValueError if it is not one."""
    match = SIZE_RE.match(size)
    if not match:
        raise ValueError(f"a size must look like 1024x1024, got {size!r}")
    return int(match[1]), int(match[2])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    name: str = Field(
        "tiny-flux",
        min_length=1,
        max_length=200,
        description="The model id clients see in GET /v1/models and pass as `model`.",
    )
    family: str = Field("flux", description="The diffusers pipeline family (see `family_names`).")
    path: str = Field(
        "builtin:tiny-flux",
        min_length=1,
        description=(
            "A local diffusers-format folder (absolute path), a hub id (downloaded only when the"
            " host has network), or `builtin:tiny-flux`, the embedded tiny model made locally."
        ),
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights and activation dtype for every stage."
    )
    max_sequence_length: int = Field(
        512, ge=16, le=512, description="T5 tokens per prompt; longer prompts get a 400."
    )

    @field_validator("family")
    @classmethod
    def _known_family(cls, family: str) -> str:
        if family not in family_names():
            raise ValueError(f"unknown family {family!r}; known: {list(family_names())}")
        return family

    @model_validator(mode="after")
    def _builtin_matches_family(self) -> "ModelConfig":
        if self.path.startswith("builtin:"):
            name = self.path.removeprefix("builtin:")
            known = builtin_models()
            if name not in known:
                raise ValueError(f"unknown builtin model {self.path!r}; known: {sorted(known)}")
            if known[name].name != self.family:
                raise ValueError(f"{self.path} is a {known[name].name} model, not {self.family}")
        return self


class BatchingConfig(_Strict):
    max_batch_size: int = Field(
        8, ge=1, le=256, description="Most items in one batch (images for the denoiser)."
    )
    batch_wait_timeout_s: float = Field(
        0.01, ge=0.0, le=10.0, description="How long a batch waits to fill after its first item."
    )


class StageConfig(_Strict):
    batching: BatchingConfig = BatchingConfig()
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="`auto`: cuda when Ray gave the replica a GPU, else cpu."
    )
    torch_threads: Optional[int] = Field(
        None, ge=1, le=256, description="torch intra-op threads in this stage's processes."
    )


class DenoiserConfig(StageConfig):
    ulysses_degree: int = Field(1, ge=1, le=64, description="xDiT Ulysses sequence-parallel degree.")
    ring_degree: int = Field(1, ge=1, le=64, description="xDiT ring-attention degree.")
    worker_num_gpus: float = Field(
        0.0, ge=0.0, le=1.0, description="GPUs per worker actor (one worker per SP rank)."
    )
    worker_num_cpus: float = Field(1.0, ge=0.0, le=64.0, description="CPUs per worker actor.")
    replica_num_cpus: float = Field(
        0.1, gt=0.0, le=64.0, description="CPUs of the replica actor itself (placement bundle 0)."
    )
    worker_call_timeout_s: float = Field(
        900.0, gt=0.0, description="A worker call taking longer marks the worker group broken."
    )
    process_group_timeout_s: float = Field(
        600.0,
        ge=1.0,
        le=86400.0,
        description=(
            "torch.distributed timeout of every group of an SP replica (xfuser's included): a"
            " collective waiting longer fails and the replica is replaced. Idle groups never"
            " time out."
        ),
    )
    health_ping_timeout_s: float = Field(
        10.0, gt=0.0, le=600.0, description="A worker not answering a ping within this is hung."
    )
    compile_blocks: bool = Field(
        False,
        description="torch.compile every transformer block (slower start, faster steps on GPU).",
    )
    warmup_sizes: Optional[tuple[str, ...]] = Field(
        None,
        max_length=16,
        description=(
            "Sizes (WxH) each new replica runs once with dummy embeddings before it takes"
            " requests (CUDA kernels, NCCL communicators). Default: defaults.size; [] for none."
        ),
    )
    warmup_batch_sizes: tuple[Annotated[int, Field(ge=1, le=256)], ...] = Field(
        (1,),
        max_length=16,
        description=(
            "Batch sizes (images) each warm-up size runs with. With compile_blocks every new"
            " (batch, size) compiles once: list the batches your load forms."
        ),
    )

    @property
    def world_size(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @model_validator(mode="after")
    def _worker_has_resources(self) -> "DenoiserConfig":
        if self.worker_num_gpus == 0 and self.worker_num_cpus == 0:
            raise ValueError("a denoiser worker needs worker_num_gpus > 0 or worker_num_cpus > 0")
        if self.ring_degree > 1 and (self.worker_num_gpus == 0 or self.device == "cpu"):
            raise ValueError("ring_degree > 1 needs GPU workers (ring attention has no CPU kernel)")
        if self.world_size > 64:
            raise ValueError("ulysses_degree x ring_degree must be at most 64")
        return self


class LimitsConfig(_Strict):
    min_size: int = Field(64, ge=16, le=8192, description="Smallest width/height in pixels.")
    max_size: int = Field(512, ge=16, le=8192, description="Largest width/height in pixels.")
    max_n: int = Field(4, ge=1, le=64, description="Most images per request.")
    max_steps: int = Field(50, ge=1, le=1000, description="Most num_inference_steps.")
    max_guidance_scale: float = Field(20.0, ge=0.0, le=100.0)
    max_prompt_chars: int = Field(4000, ge=1, le=100_000)


class DefaultsConfig(_Strict):
    size: str = Field("256x256", description="Used when a request gives no size.")
    num_inference_steps: int = Field(4, ge=1)
    guidance_scale: float = Field(3.5, ge=0.0)
    output_format: Literal["png", "jpeg", "webp"] = "png"


class ImageStoreConfig(_Strict):
    directory: Optional[str] = Field(
        None,
        description=(
            "Where result images are written (url-format images, async jobs' results), private"
            " to this user; default: `images/` in the data folder ($DIT_SERVE_DATA, else"
            " ~/.local/share/dit-serve)."
        ),
    )
    public_base_url: Optional[str] = Field(
        None, description="Base of returned image URLs; default: the base URL the client used."
    )


class JobStoreConfig(_Strict):
    backend: Literal["sqlite", "redis"] = Field(
        "sqlite",
        description="`sqlite`: a file, for one node (the default). `redis`: a server, for clusters.",
    )
    path: Optional[str] = Field(
        None,
        description=(
            "SQLite file (absolute path); default: jobs-<model name>.sqlite3 in the data folder."
            " Applications sharing a store share one queue: give each model its own."
        ),
    )
    url: Optional[str] = Field(None, description="Redis server, e.g. redis://10.0.0.5:6379/0.")
    prefix: Optional[str] = Field(
        None, min_length=1, max_length=128, description="Redis key prefix; default dit-serve:<model>."
    )

    @model_validator(mode="after")
    def _backend_has_its_address(self) -> "JobStoreConfig":
        if self.backend == "redis" and not self.url:
            raise ValueError("jobs.store.url is required with backend redis")
        if self.path is not None and not self.path.startswith("/"):
            raise ValueError("jobs.store.path must be absolute (replicas do not share a cwd)")
        return self


class JobsConfig(_Strict):
    """How accepted requests are kept and run (see docs/request-lifecycle.md)."""

    store: JobStoreConfig = JobStoreConfig()
    max_running: int = Field(
        16,
        ge=1,
        le=4096,
        description=(
            "Async jobs one ingress replica runs at once; more wait `queued` in the store. Sync"
            " and streamed requests run at once (their connections wait)."
        ),
    )
    max_attempts: int = Field(
        3, ge=1, le=20, description="Tries of a request when a stage dies under it (then failed)."
    )
    retry_backoff_s: float = Field(
        1.0, ge=0.0, le=600.0, description="Wait before the second try; doubles on each next one."
    )
    lease_s: float = Field(
        15.0,
        ge=1.0,
        le=3600.0,
        description=(
            "A running request's record is leased to the ingress running it, renewed every"
            " lease_s/3; once expired (that ingress died), any ingress re-queues or ends it."
        ),
    )
    poll_interval_s: float = Field(
        0.5, gt=0.0, le=60.0, description="How often an idle dispatcher looks for queued jobs."
    )
    maintenance_interval_s: float = Field(
        5.0, gt=0.0, le=3600.0, description="How often expired leases and records are handled."
    )
    retention_s: float = Field(
        86400.0,
        ge=1.0,
        description="Finished records, their events and images are deleted this long after.",
    )


class AppConfig(_Strict):
    model: ModelConfig = ModelConfig()
    text_encoder: StageConfig = StageConfig()
    denoiser: DenoiserConfig = DenoiserConfig()
    vae_decoder: StageConfig = StageConfig()
    limits: LimitsConfig = LimitsConfig()
    defaults: DefaultsConfig = DefaultsConfig()
    image_store: ImageStoreConfig = ImageStoreConfig()
    jobs: JobsConfig = JobsConfig()

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this: the family's latent patch in pixels."""
        return family_spec(self.model.family).size_multiple

    @property
    def height_multiple(self) -> int:
        """Heights must be multiples of this: sequence parallelism splits the image into
        `world_size` bands of latent rows (xfuser requires equal bands)."""
        return self.size_multiple * self.denoiser.world_size

    def size_error(self, width: int, height: int) -> Optional[str]:
        """Why this size cannot be served, or None."""
        lim, m, hm = self.limits, self.size_multiple, self.height_multiple
        if not all(lim.min_size <= v <= lim.max_size for v in (width, height)):
            return f"width and height must be between {lim.min_size} and {lim.max_size}"
        if width % m or height % m:
            return f"width and height must be multiples of {m}"
        if height % hm:
            return (
                f"height must be a multiple of {hm}: the denoiser splits the image into"
                f" {self.denoiser.world_size} bands of rows (sequence parallelism)"
            )
        return None

    @property
    def warmup_shapes(self) -> tuple[tuple[int, int, int], ...]:
        """(batch, width, height) of each shape a new denoiser replica runs before serving."""
        sizes = self.denoiser.warmup_sizes
        sizes = (self.defaults.size,) if sizes is None else sizes
        return tuple(
            (batch, *parse_size(s)) for s in sizes for batch in self.denoiser.warmup_batch_sizes
        )

    @model_validator(mode="after")
    def _consistent(self) -> "AppConfig":
        lim, m = self.limits, self.size_multiple
        if lim.min_size > lim.max_size:
            raise ValueError("limits.min_size must not exceed limits.max_size")
        for name in ("min_size", "max_size"):
            if getattr(lim, name) % m:
                raise ValueError(f"limits.{name} must be a multiple of {m}")
        if max(self.denoiser.warmup_batch_sizes, default=1) > self.denoiser.batching.max_batch_size:
            raise ValueError("denoiser.warmup_batch_sizes must not exceed its max_batch_size")
        for stage in ("denoiser", "vae_decoder"):  # their batches are weighed in images
            if lim.max_n > getattr(self, stage).batching.max_batch_size:
                raise ValueError(f"limits.max_n must not exceed {stage}.batching.max_batch_size")
        for name, size in [("defaults.size", self.defaults.size)] + [
            ("denoiser.warmup_sizes", s) for s in self.denoiser.warmup_sizes or ()
        ]:
            error = self.size_error(*parse_size(size))
            if error:
                raise ValueError(f"{name} {size}: {error}")
        if self.defaults.num_inference_steps > lim.max_steps:
            raise ValueError("defaults.num_inference_steps exceeds limits.max_steps")
        if self.defaults.guidance_scale > lim.max_guidance_scale:
            raise ValueError("defaults.guidance_scale exceeds limits.max_guidance_scale")
        return self
