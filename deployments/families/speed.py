"""The denoiser's speed knobs, applied to a loaded transformer in one place for every family.

Each is off unless the config asks (see `DenoiserConfig`): what it trades is in README's
"Speed knobs" section, its measured speed and drift in docs/benchmarks.md.

- `attention_backend`: diffusers' attention dispatch (`set_attention_backend`), e.g. `flash`
  (FlashAttention 2), `_flash_3` (FlashAttention 3, Hopper), `sage`, `_native_cudnn`.
- `quantization: fp8`: torchao's dynamic float8 activations x float8 weights (per-row scales) for
  the transformer's linear layers; needs a GPU of compute capability 8.9+ (Ada, Hopper).
- `step_cache`: diffusers' own cache hooks (`enable_cache`): `first_block` (skip the remaining
  blocks while the first block's residual barely changes) or `taylorseer` (forecast block outputs
  between full steps). Lossy, and a batch decides together: a row's image can depend on the rows
  it was batched with.
- `compile_blocks` (+ `cuda_graphs`): `torch.compile` every transformer block, one static-shape
  graph per (batch, size); with `cuda_graphs` in "reduce-overhead" mode (CUDA graphs).
- `batch_buckets`: the transformer batch sizes warmed up; a batch in between is padded up to the
  next one (padding rows repeat the last row and are cut from the output), so a live batch never
  compiles a new graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

if TYPE_CHECKING:
    import torch

    from deployments.families.base import LoadSpec


def apply_speed_knobs(transformer, load: "LoadSpec", blocks: Sequence) -> None:
    """Everything but the padding, in the order they compose: backend, fp8, cache, then compile."""
    if load.attention_backend:
        transformer.set_attention_backend(load.attention_backend)
    if load.quantization == "fp8":
        quantize_fp8(transformer)
    if load.step_cache:
        transformer.enable_cache(cache_config(load.step_cache))
    if load.compile_blocks:
        compile_blocks(blocks, "reduce-overhead" if load.cuda_graphs else None)


def fp8_supported() -> Optional[str]:
    """None when this process can run float8 matmuls, else why not."""
    import torch

    if not torch.cuda.is_available():
        return "it needs a CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        return f"it needs compute capability 8.9+ (this GPU has {major}.{minor})"
    return None


def quantize_fp8(transformer) -> None:
    why_not = fp8_supported()
    if why_not:
        raise ValueError(f"denoiser.quantization fp8: {why_not} (Ada, Hopper or newer)")
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))


def cache_config(step_cache: Mapping[str, Any]):
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

    kind = step_cache["kind"]
    if kind == "first_block":
        return FirstBlockCacheConfig(threshold=step_cache["threshold"])
    return TaylorSeerCacheConfig(cache_interval=step_cache["interval"], max_order=1)


def compile_blocks(blocks: Sequence, mode: Optional[str]) -> None:
    """Static shapes: dynamic ones compile slower kernels and lose much of the gain. Each new
    (batch, size) compiles once (~10 s at FLUX.1-dev scale): warm them up."""
    import torch

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for block in blocks:
        block.compile(dynamic=False, mode=mode)


def new_run(transformer) -> None:
    """A new batch starts (or its rows changed): the step cache's per-batch state goes."""
    if getattr(transformer, "is_cache_enabled", False):
        transformer._reset_stateful_cache()


def cache_context(transformer):
    """The context diffusers' cache hooks key their state by (one per forward kind: we run one);
    nothing for transformers without the hooks."""
    import contextlib

    if hasattr(transformer, "cache_context"):
        return transformer.cache_context("cond")
    return contextlib.nullcontext()


def bucket_for(rows: int, buckets: Sequence[int]) -> int:
    """The smallest warmed batch size that holds `rows`; `rows` itself past the largest."""
    return min((b for b in buckets if b >= rows), default=rows)


def padded_call(transformer, buckets: Sequence[int], batched: Mapping[str, "torch.Tensor"], **fixed):
    """`transformer(**batched, **fixed)[0]` with every batched tensor (first dimension = rows)
    padded to `bucket_for(rows)` by repeating its last row; the padding is cut from the output."""
    import torch

    rows = batched["hidden_states"].shape[0]
    target = bucket_for(rows, buckets)
    if target > rows:
        batched = {
            k: None if v is None else torch.cat([v, v[-1:].expand(target - rows, *v.shape[1:])])
            for k, v in batched.items()
        }
    return transformer(**batched, **fixed, return_dict=False)[0][:rows]
