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
from deployments.memory_budget import config_error as denoiser_memory_error

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
    family: Optional[str] = Field(
        None,
        description=(
            "The diffusers pipeline family: flux, sd3 (SD3 and SD3.5) or pixart (PixArt-Sigma)."
            " Default: read from the checkpoint's model_index.json (a local folder or builtin"
            " model; a hub id needs it set)."
        ),
    )
    path: str = Field(
        "builtin:tiny-flux",
        min_length=1,
        description=(
            "A local diffusers-format folder (absolute path), a hub id (downloaded only when the"
            " host has network), or `builtin:tiny-<family>` (tiny-flux, tiny-sd3, tiny-pixart),"
            " an embedded tiny model made locally."
        ),
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights and activation dtype for every stage."
    )
    max_sequence_length: Optional[int] = Field(
        None,
        ge=16,
        le=512,
        description=(
            "T5 tokens per prompt (and per negative prompt); longer prompts get a 400. Default:"
            " the family pipeline's own (flux 512, sd3 256, pixart 300)."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _family_and_lengths(cls, data):
        """Fill in the family (from the checkpoint) and the family's sequence length."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        path = data.get("path", cls.model_fields["path"].default)
        if data.get("family") is None and isinstance(path, str):
            if path.startswith("builtin:") and path.removeprefix("builtin:") in builtin_models():
                data["family"] = builtin_models()[path.removeprefix("builtin:")].name
            elif not path.startswith("builtin:"):
                from deployments.families.checkpoint import detect_family

                data["family"] = detect_family(path)
        family = data.get("family")
        if data.get("max_sequence_length") is None and family in family_names():
            data["max_sequence_length"] = family_spec(family).default_max_sequence_length
        return data

    @field_validator("family")
    @classmethod
    def _known_family(cls, family: Optional[str]) -> Optional[str]:
        if family is not None and family not in family_names():
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
        0.0,
        ge=0.0,
        le=10.0,
        description=(
            "How long an item that reaches an idle stage waits for others to batch with (0: it"
            " runs at once). Items that queue while a batch runs join the next batch with no wait."
        ),
    )
    mode: Optional[Literal["request", "step"]] = Field(
        None,
        description=(
            "Denoiser only (other stages refuse `step`). `request`: a batch of same-key requests"
            " (size, steps, guidance) runs to its last step before the next starts. `step`:"
            " requests join and leave a running batch at step boundaries, each row at its own"
            " step, step count and guidance (same size only, max_batch_size transformer rows, an"
            " image with classifier-free guidance counting twice); with sequence parallelism but"
            " not cfg_degree 2, without step_cache. Unset: `step` for the denoiser, unless the"
            " config sets cfg_degree 2 or a step_cache (then `request`); `request` elsewhere."
        ),
    )


class StageConfig(_Strict):
    batching: BatchingConfig = BatchingConfig()
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="`auto`: cuda when Ray gave the replica a GPU, else cpu."
    )
    torch_threads: Optional[int] = Field(
        None, ge=1, le=256, description="torch intra-op threads in this stage's processes."
    )


ATTENTION_BACKENDS = (
    "native",
    "_native_cudnn",
    "_native_efficient",
    "_native_flash",
    "flash",
    "_flash_3",
    "flex",
    "sage",
    "xformers",
)


class StepCacheConfig(_Strict):
    kind: Literal["first_block", "taylorseer"] = Field(
        description=(
            "first_block: diffusers' first-block cache (skip the other blocks while the first"
            " block's output barely changes); taylorseer: diffusers' TaylorSeer cache (full"
            " steps every `interval`, forecast in between)."
        )
    )
    threshold: float = Field(
        0.05, gt=0.0, le=1.0, description="first_block: the relative change below which a step is skipped."
    )
    interval: int = Field(5, ge=2, le=50, description="taylorseer: a full step every `interval` steps.")


class VAEDecoderConfig(StageConfig):
    encode_threads: int = Field(
        2,
        ge=1,
        le=64,
        description=(
            "Threads that encode decoded images (png/jpeg/webp), off the decode thread: the next"
            " batch decodes while the last one's images compress."
        ),
    )
    png_compress_level: int = Field(
        6,
        ge=0,
        le=9,
        description=(
            "zlib level for PNG output: 6 is PIL's default; 1 encodes faster for larger files;"
            " 0 stores uncompressed. The pixels are the same at every level."
        ),
    )


class DenoiserConfig(StageConfig):
    ulysses_degree: int = Field(1, ge=1, le=64, description="xDiT Ulysses sequence-parallel degree.")
    ring_degree: int = Field(1, ge=1, le=64, description="xDiT ring-attention degree.")
    cfg_degree: Literal[1, 2] = Field(
        1,
        description=(
            "2: classifier-free guidance in parallel (xDiT's CFG-parallel): the unconditional and"
            " the conditional branch on two ranks, each an SP group of ulysses x ring ranks."
            " Families with CFG only (sd3, pixart)."
        ),
    )
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
    cuda_graphs: bool = Field(
        False,
        description=(
            "With compile_blocks: compile in 'reduce-overhead' mode (CUDA graphs), fewer kernel"
            " launches per step for more device memory per warmed shape. GPU only."
        ),
    )
    attention_backend: Optional[Literal[ATTENTION_BACKENDS]] = Field(  # type: ignore[valid-type]
        None,
        description=(
            "diffusers' attention backend for the transformer (e.g. flash, _flash_3 on Hopper,"
            " sage); its package must be installed. Default: PyTorch's SDPA. Not with SP (xDiT"
            " runs attention then)."
        ),
    )
    quantization: Optional[Literal["fp8"]] = Field(
        None,
        description=(
            "fp8: torchao's dynamic float8 activations and weights for the transformer's linear"
            " layers (GPU of compute capability 8.9+, `pip install dit-serve[speed]`). Faster,"
            " half the weight memory, small numeric drift (docs/benchmarks.md)."
        ),
    )
    step_cache: Optional[StepCacheConfig] = Field(
        None,
        description=(
            "Skip or forecast transformer work between steps with diffusers' cache hooks. Lossy,"
            " opt-in; a batch decides together, so an image can depend on its batch-mates."
        ),
    )
    warmup_sizes: Optional[tuple[str, ...]] = Field(
        None,
        max_length=16,
        description=(
            "Sizes (WxH) each new replica runs once with dummy embeddings before it takes"
            " requests (CUDA kernels, NCCL communicators). Default: defaults.size; [] for none."
        ),
    )
    warmup_batch_sizes: Optional[tuple[Annotated[int, Field(ge=1, le=256)], ...]] = Field(
        None,
        max_length=16,
        description=(
            "Batch sizes (images) each warm-up size runs with. With compile_blocks they are also"
            " the buckets a live batch is padded up to, so no request waits for a compile."
            " Default: 1; with compile_blocks, the powers of two below batching.max_batch_size"
            " and max_batch_size itself."
        ),
    )

    @property
    def warmup_batches(self) -> tuple[int, ...]:
        if self.warmup_batch_sizes is not None:
            return self.warmup_batch_sizes
        if not self.compile_blocks:
            return (1,)
        top = self.batching.max_batch_size
        return tuple(sorted({2**i for i in range(top.bit_length()) if 2**i < top} | {top}))
    memory_budget_gb: Optional[float] = Field(
        None,
        gt=0.0,
        le=100_000.0,
        description=(
            "Device memory (GiB) one denoiser worker may use. The largest batch the config admits"
            " (batching.max_batch_size images of limits.max_size squared) must fit it, by the"
            " family's memory estimate (deployments/memory_budget.py): checked here and by each"
            " replica at start. None: on a GPU the device's total memory x worker_num_gpus,"
            " on CPU unchecked."
        ),
    )

    @property
    def sp_degree(self) -> int:
        """Ranks one image's token sequence is split over."""
        return self.ulysses_degree * self.ring_degree

    @property
    def world_size(self) -> int:
        """Worker actors (one device each) of one replica."""
        return self.cfg_degree * self.sp_degree

    @property
    def batching_mode(self) -> str:
        """`batching.mode`, or when unset: `step`, unless cfg_degree 2 or a step cache asks for
        what only the request mode does (an explicit `step` with them is refused)."""
        if self.batching.mode:
            return self.batching.mode
        return "request" if self.cfg_degree > 1 or self.step_cache else "step"

    @model_validator(mode="after")
    def _worker_has_resources(self) -> "DenoiserConfig":
        if self.worker_num_gpus == 0 and self.worker_num_cpus == 0:
            raise ValueError("a denoiser worker needs worker_num_gpus > 0 or worker_num_cpus > 0")
        if self.ring_degree > 1 and (self.worker_num_gpus == 0 or self.device == "cpu"):
            raise ValueError("ring_degree > 1 needs GPU workers (ring attention has no CPU kernel)")
        if self.world_size > 64:
            raise ValueError("cfg_degree x ulysses_degree x ring_degree must be at most 64")
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
    guidance_scale: Optional[float] = Field(
        None,
        ge=0.0,
        description="Default: the family pipeline's own (flux 3.5, sd3 7.0, pixart 4.5).",
    )
    output_format: Literal["png", "jpeg", "webp"] = "png"


class S3ImageStoreConfig(_Strict):
    """An S3-compatible bucket for result images. Credentials come from the standard AWS chain
    (AWS_* environment variables, shared credential files, instance or pod roles), never from
    here."""

    bucket: Optional[str] = Field(
        None,
        pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$",
        description="Bucket name (3-63 lowercase letters, digits, dots, hyphens). Required.",
    )
    prefix: Optional[str] = Field(
        None,
        max_length=512,
        pattern=r"^([A-Za-z0-9!_.*'()-]+/)*$",
        description="Key prefix, empty or ending in `/`; default: dit-serve/<model name>/.",
    )
    endpoint_url: Optional[str] = Field(
        None,
        pattern=r"^https?://[^\s/]+(/\S*)?$",
        description="For MinIO, Ceph RGW and other S3-compatible servers; default: AWS S3.",
    )
    region: Optional[str] = Field(
        None,
        pattern=r"^[a-z0-9-]{1,64}$",
        description="Region; default: from the AWS environment (AWS_REGION, ~/.aws/config).",
    )
    create_bucket: bool = Field(False, description="Create the bucket at start if it is missing.")
    addressing_style: Optional[Literal["auto", "path", "virtual"]] = Field(
        None, description="Default: `path` with an endpoint_url (MinIO, Ceph), else `auto`."
    )


class ImageStoreConfig(_Strict):
    backend: Literal["local", "s3"] = Field(
        "local",
        description=(
            "`local`: a folder of this node (or a shared file system), the default. `s3`: an"
            " S3-compatible bucket every node reaches, for clusters."
        ),
    )
    directory: Optional[str] = Field(
        None,
        description=(
            "backend local: where result images are written (url-format images, async jobs'"
            " results), private to this user (absolute path); default: `images/` in the data"
            " folder ($DIT_SERVE_DATA, else ~/.local/share/dit-serve)."
        ),
    )
    public_base_url: Optional[str] = Field(
        None, description="Base of returned image URLs; default: the base URL the client used."
    )
    s3: Optional[S3ImageStoreConfig] = Field(None, description="backend s3: the bucket.")

    @model_validator(mode="after")
    def _backend_has_its_settings(self) -> "ImageStoreConfig":
        if self.directory is not None and not self.directory.startswith("/"):
            raise ValueError("image_store.directory must be absolute (replicas do not share a cwd)")
        if self.backend == "s3":
            if self.s3 is None or not self.s3.bucket:
                raise ValueError("image_store.s3.bucket is required with backend s3")
            if self.directory is not None:
                raise ValueError("image_store.directory is for backend local, not s3")
        elif self.s3 is not None:
            raise ValueError("image_store.s3 is set but the backend is local; set backend: s3")
        return self


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


class AdmissionConfig(_Strict):
    """What the service accepts before it says 429 (see docs/admission.md). A request's cost is
    images x steps x megapixels (n x num_inference_steps x width x height / 1e6)."""

    max_pending_cost: float = Field(
        400.0,
        gt=0.0,
        description=(
            "Budget of accepted, unfinished work (queued and running, every request kind) in"
            " cost units; past it a new request gets 429 + Retry-After. A request bigger than"
            " the whole budget still runs when nothing else is pending."
        ),
    )
    max_pending: int = Field(
        256, ge=1, le=100_000, description="Most accepted, unfinished requests, whatever their cost."
    )
    throughput_hint: float = Field(
        1.0,
        gt=0.0,
        description=(
            "Cost units the app finishes per second, for Retry-After before any request has"
            " finished (then measured from the last minute of finished requests)."
        ),
    )
    max_retry_after_s: int = Field(120, ge=1, le=3600, description="Cap on the Retry-After given.")
    default_deadline_s: Optional[float] = Field(
        600.0,
        gt=0.0,
        description=(
            "A request not finished this long after it was accepted ends with 504"
            " deadline_exceeded and frees its place; a request may ask for less or more"
            " (`deadline_s`, up to max_deadline_s). null: no default deadline."
        ),
    )
    max_deadline_s: float = Field(86400.0, gt=0.0, description="Largest `deadline_s` accepted.")
    priority_boost_s: float = Field(
        30.0,
        ge=0.0,
        le=86400.0,
        description=(
            "Each priority level moves a queued job ahead of jobs queued up to this many seconds"
            " before it; older jobs still go first, so low priorities never starve."
        ),
    )
    requests_per_minute: Optional[int] = Field(
        None, ge=1, description="Per API key (or for everyone without keys): generation requests a minute."
    )
    max_active_per_key: Optional[int] = Field(
        None, ge=1, description="Per API key: accepted, unfinished requests at once."
    )
    stage_max_queued_requests: Optional[int] = Field(
        None,
        ge=1,
        description=(
            "Serve's max_queued_requests for each stage deployment (default: 2 x max_pending,"
            " which admission never reaches): a safety net, not the admission rule."
        ),
    )

    @model_validator(mode="after")
    def _deadlines(self) -> "AdmissionConfig":
        if self.default_deadline_s is not None and self.default_deadline_s > self.max_deadline_s:
            raise ValueError("admission.default_deadline_s exceeds admission.max_deadline_s")
        return self


KEY_NAME_RE = r"^[A-Za-z0-9._-]{1,64}$"


class ApiKeyConfig(_Strict):
    name: str = Field(..., pattern=KEY_NAME_RE, description="The tenant this key acts for.")
    sha256: str = Field(
        ..., pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the key, lowercase hex (never the key)."
    )
    requests_per_minute: Optional[int] = Field(None, ge=1, description="Overrides admission's.")
    max_active: Optional[int] = Field(None, ge=1, description="Overrides admission.max_active_per_key.")


class AuthConfig(_Strict):
    """API keys (`Authorization: Bearer <key>`). Off unless keys are given here, in `keys_env` or in
    `keys_file`; then every route but /health, /ready and the API docs needs a valid key, and each
    key sees only its own jobs, events and images."""

    keys: tuple[ApiKeyConfig, ...] = Field((), max_length=10_000)
    keys_env: Optional[str] = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable of the replicas holding `name:sha256` entries (comma or newline separated).",
    )
    keys_file: Optional[str] = Field(
        None, description="Absolute path of a file of `name:sha256` lines (# comments allowed)."
    )

    @field_validator("keys_file")
    @classmethod
    def _absolute(cls, path: Optional[str]) -> Optional[str]:
        if path is not None and not path.startswith("/"):
            raise ValueError("auth.keys_file must be absolute (replicas do not share a cwd)")
        return path

    @property
    def enabled(self) -> bool:
        return bool(self.keys or self.keys_env or self.keys_file)


class CorsConfig(_Strict):
    allow_origins: list[Annotated[str, Field(pattern=r"^(\*|https?://[^/\s]+)$")]] = Field(
        [],
        max_length=1000,
        description=(
            "Browser origins (`https://app.example.com`, or `*`) allowed to call the API (CORS);"
            " empty (the default): CORS off, no CORS headers on any response."
        ),
    )


class HttpConfig(_Strict):
    allowed_hosts: list[Annotated[str, Field(pattern=r"^(\*|(\*\.)?[^*/\s]+)$")]] = Field(
        ["*"],
        min_length=1,
        max_length=1000,
        description=(
            "Host header values served (`api.example.com`, `*.example.com`; `*`: any, the"
            " default); others get a 400. Set it when image URLs are built from the Host a"
            " client sent (no image_store.public_base_url)."
        ),
    )


def _speed_knob_error(dn: DenoiserConfig) -> Optional[str]:
    if dn.cuda_graphs and not dn.compile_blocks:
        return "denoiser.cuda_graphs needs denoiser.compile_blocks: true (CUDA graphs are captured from compiled blocks)"
    if dn.cuda_graphs and dn.device == "cpu":
        return "denoiser.cuda_graphs needs a GPU (denoiser.device is cpu)"
    if dn.quantization and dn.device == "cpu":
        return f"denoiser.quantization {dn.quantization} needs a GPU of compute capability 8.9+ (denoiser.device is cpu)"
    if dn.world_size > 1 and dn.attention_backend:
        return (
            "denoiser.attention_backend applies to one GPU per replica; with ulysses, ring or cfg"
            " degrees above 1, xDiT runs attention (leave attention_backend unset)"
        )
    if dn.step_cache and dn.compile_blocks:
        return (
            "denoiser.step_cache with compile_blocks: the cache hooks decide each step in Python"
            " around the compiled blocks, which then recompile (a FLUX.1-dev-sized warm-up on an"
            " H100 did not finish in 7 minutes); use one or the other"
        )
    if dn.world_size > 1 and dn.step_cache:
        return (
            "denoiser.step_cache needs one rank per replica: with several, each rank would decide"
            " to skip steps from its own part of the work and the ranks would fall out of step"
        )
    return None


class ModelEntry(_Strict):
    """One model of an application serving several (`models:`): its own checkpoint and, where
    given, its own stage, limits and defaults blocks (else the application's)."""

    model: ModelConfig
    text_encoder: Optional[StageConfig] = None
    denoiser: Optional["DenoiserConfig"] = None
    vae_decoder: Optional[VAEDecoderConfig] = None
    limits: Optional[LimitsConfig] = None
    defaults: Optional[DefaultsConfig] = None


# The blocks a `models:` entry may set for itself.
PER_MODEL = ("text_encoder", "denoiser", "vae_decoder", "limits", "defaults")
DEPLOYMENT_SLUG_RE = re.compile(r"[^A-Za-z0-9_-]+")


class AppConfig(_Strict):
    model: ModelConfig = ModelConfig()
    models: tuple[ModelEntry, ...] = Field(
        (),
        max_length=32,
        description=(
            "Several models in one application, each with its own stage deployments (own"
            " tokenizers, weights, replicas and autoscaling), named <Stage>-<model name>."
            " Requests pick one by `model` (default: the first). Leave `model` unset with it."
        ),
    )
    store_name: Optional[str] = Field(
        None,
        min_length=1,
        max_length=200,
        description="Name of the app's job queue and image prefix; default: its (first) model's name.",
    )
    text_encoder: StageConfig = StageConfig()
    denoiser: DenoiserConfig = DenoiserConfig()
    vae_decoder: VAEDecoderConfig = VAEDecoderConfig()
    limits: LimitsConfig = LimitsConfig()
    defaults: DefaultsConfig = DefaultsConfig()
    image_store: ImageStoreConfig = ImageStoreConfig()
    jobs: JobsConfig = JobsConfig()
    admission: AdmissionConfig = AdmissionConfig()
    auth: AuthConfig = AuthConfig()
    cors: CorsConfig = CorsConfig()
    http: HttpConfig = HttpConfig()

    @property
    def store_key(self) -> str:
        """The name the app's job store and images are kept under (shared by every model)."""
        if self.store_name:
            return self.store_name
        return self.models[0].model.name if self.models else self.model.name

    def views(self) -> dict[str, "AppConfig"]:
        """model name -> the config its stages and its requests see: a one-model config with that
        model's blocks, sharing the app's job store, image store, admission and auth."""
        if not self.models:
            return {self.model.name: self}
        shared = {
            name: getattr(self, name)
            for name in type(self).model_fields
            if name not in ("model", "models", "store_name") + PER_MODEL
        }
        return {
            entry.model.name: AppConfig(
                model=entry.model,
                store_name=self.store_key,
                **shared,
                **{name: getattr(entry, name) or getattr(self, name) for name in PER_MODEL},
            )
            for entry in self.models
        }

    def deployment_suffix(self, model_name: str) -> str:
        """What a model's stage deployments are named after: `Denoiser` for a one-model app,
        `Denoiser-<model>` with `models:` (characters other than letters, digits, _ and - become -)."""
        if not self.models:
            return ""
        return "-" + DEPLOYMENT_SLUG_RE.sub("-", model_name).strip("-")

    @property
    def default_guidance_scale(self) -> float:
        guidance = self.defaults.guidance_scale
        return family_spec(self.model.family).default_guidance_scale if guidance is None else guidance

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this: the family's latent patch in pixels."""
        return family_spec(self.model.family).size_multiple

    @property
    def height_multiple(self) -> int:
        """Heights must be multiples of this: sequence parallelism splits the image into
        `sp_degree` bands of latent rows (xfuser requires equal bands)."""
        return self.size_multiple * self.denoiser.sp_degree

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
                f" {self.denoiser.sp_degree} bands of rows (sequence parallelism)"
            )
        return None

    @property
    def warmup_shapes(self) -> tuple[tuple[int, int, int], ...]:
        """(batch, width, height) of each shape a new denoiser replica runs before serving."""
        sizes = self.denoiser.warmup_sizes
        sizes = (self.defaults.size,) if sizes is None else sizes
        return tuple(
            (batch, *parse_size(s)) for s in sizes for batch in self.denoiser.warmup_batches
        )

    @property
    def transformer_buckets(self) -> tuple[int, ...]:
        """The transformer batch sizes warm-up compiles (images x guidance branches per rank);
        empty unless compile_blocks, for only a compiled graph needs a fixed batch."""
        dn = self.denoiser
        if not dn.compile_blocks:
            return ()
        branches = 2 if family_spec(self.model.family).cfg and dn.cfg_degree == 1 else 1
        return tuple(sorted({b * branches for b in dn.warmup_batches}))

    @model_validator(mode="after")
    def _consistent(self) -> "AppConfig":
        if self.models:
            return self._models_consistent()
        lim, m = self.limits, self.size_multiple
        if lim.min_size > lim.max_size:
            raise ValueError("limits.min_size must not exceed limits.max_size")
        for name in ("min_size", "max_size"):
            if getattr(lim, name) % m:
                raise ValueError(f"limits.{name} must be a multiple of {m}")
        if max(self.denoiser.warmup_batches, default=1) > self.denoiser.batching.max_batch_size:
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
        if self.default_guidance_scale > lim.max_guidance_scale:
            raise ValueError("defaults.guidance_scale exceeds limits.max_guidance_scale")
        parallel_error = self._parallel_error() or self._step_mode_error()
        if parallel_error:
            raise ValueError(parallel_error)
        memory_error = denoiser_memory_error(self)
        if memory_error:
            raise ValueError(memory_error)
        return self

    def _step_mode_error(self) -> Optional[str]:
        """Why `batching.mode: step` cannot run here, or None (deployments/step_scheduler.py)."""
        for stage in ("text_encoder", "vae_decoder"):
            if getattr(self, stage).batching.mode == "step":
                return f"{stage}.batching.mode step: step-level batching is for the denoiser only"
        dn, family = self.denoiser, family_spec(self.model.family)
        if dn.batching.mode != "step":
            return None
        if not family.step_rows:
            return (
                f"denoiser.batching.mode step needs per-row denoising, which {family.name} does"
                " not have; run it in mode request"
            )
        if dn.cfg_degree > 1:
            return (
                "denoiser.batching.mode step with cfg_degree 2: rows with and without"
                " classifier-free guidance share each call, so the branches cannot be split over"
                " ranks; use cfg_degree 1 (sequence parallelism, ulysses/ring, works) or mode request"
            )
        if dn.step_cache:
            return (
                "denoiser.batching.mode step with denoiser.step_cache: the cache decides for a"
                " whole batch, and rows at different steps share every call; use one or the other"
            )
        return None

    def _parallel_error(self) -> Optional[str]:
        """Why the denoiser's parallel layout cannot run this model, or None."""
        dn, family = self.denoiser, family_spec(self.model.family)
        knob_error = _speed_knob_error(dn)
        if knob_error:
            return knob_error
        if dn.step_cache and not family.step_cache:
            return (
                f"denoiser.step_cache: diffusers' cache hooks do not support {family.name}'s"
                " transformer (flux has them)"
            )
        if dn.cfg_degree == 2 and not family.cfg:
            return (
                f"denoiser.cfg_degree 2 needs a model with classifier-free guidance (sd3, pixart);"
                f" {family.name} has none (FLUX.1 is guidance-distilled): use ulysses_degree or"
                " ring_degree"
            )
        from deployments.families.checkpoint import attention_heads

        heads = attention_heads(self.model.path)
        if heads and heads % dn.ulysses_degree:
            divisors = [d for d in range(1, heads + 1) if heads % d == 0]
            return (
                f"denoiser.ulysses_degree {dn.ulysses_degree} must divide the transformer's {heads}"
                f" attention heads (Ulysses gives each rank whole heads): use one of {divisors},"
                " or split further with ring_degree or cfg_degree"
            )
        if dn.sp_degree > 1 and not family.sequence_parallel:
            return (
                f"denoiser.ulysses_degree x ring_degree = {dn.sp_degree}: sequence parallelism is"
                f" not available for {family.name} yet (flux has it); split its two guidance"
                " branches over two GPUs with cfg_degree: 2 instead"
            )
        return None

    def _models_consistent(self) -> "AppConfig":
        if "model" in self.model_fields_set:
            raise ValueError("give either `model` or `models`, not both")
        names = [entry.model.name for entry in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"models: names must be unique, got {names}")
        suffixes = [self.deployment_suffix(n) for n in names]
        if len(set(suffixes)) != len(suffixes):
            raise ValueError(
                f"models: names {names} give the same deployment names; rename one"
                " (letters, digits, _ and - are kept)"
            )
        try:
            self.views()  # each model's config validates on its own
        except ValueError as exc:
            raise ValueError(f"models: {exc}") from None
        return self
