"""The denoiser's memory budget: does the largest batch the config admits fit in its worker's memory?

The largest denoise batch is `denoiser.batching.max_batch_size` images (batches are weighed in
images; one request's `limits.max_n` images never exceed it) of `limits.max_size` squared. Its
estimate (the family's memory model, e.g. `deployments.families.flux_memory`) must fit
`denoiser.memory_budget_gb` (GiB): checked when the config is validated, where the checkpoint's
architecture can be read without loading it (a local folder; FLUX.1's for a hub id), and again by
every Denoiser replica at start with its real weights and device (the budget then defaults to the
device's total memory x `denoiser.worker_num_gpus`; on CPU with no budget nothing is checked).
A batch that still runs out of memory is split (deployments.denoise_split); the check keeps that
the exception. Torch-free: the config imports it.
"""

from __future__ import annotations

from typing import Optional

from deployments.families.specs import memory_model

GIB = 1024**3


def denoise_need(config, transformer: dict, rows: int, weights_bytes: Optional[int] = None) -> Optional[int]:
    """Bytes the denoiser needs for `rows` images of limits.max_size^2 (None: no memory model)."""
    model = memory_model(config.model.family)
    if model is None:
        return None
    size = config.limits.max_size
    return model.denoise_bytes(
        transformer,
        rows,
        size,
        size,
        config.model.dtype,
        text_tokens=config.model.max_sequence_length,
        sp_degree=config.denoiser.ulysses_degree * config.denoiser.ring_degree,
        weights_bytes=weights_bytes,
    )


def budget_error(config, budget_bytes: float, transformer: dict, weights_bytes: Optional[int] = None) -> Optional[str]:
    """Why the config's largest denoise batch does not fit `budget_bytes`, naming the fields; None
    if it fits (or the family has no memory model)."""
    rows = config.denoiser.batching.max_batch_size
    need = denoise_need(config, transformer, rows, weights_bytes)
    if need is None or need <= budget_bytes:
        return None
    size = config.limits.max_size
    one = denoise_need(config, transformer, 1, weights_bytes)
    what = (
        f"even one image of limits.max_size ({size}x{size}) needs about {one / GIB:.1f} GiB"
        if one > budget_bytes
        else f"a batch of denoiser.batching.max_batch_size ({rows}) images of limits.max_size"
        f" ({size}x{size}) needs about {need / GIB:.1f} GiB"
    )
    return (
        f"denoiser memory: {what}, over the budget of {budget_bytes / GIB:.1f} GiB"
        " (denoiser.memory_budget_gb, or the GPU's memory x denoiser.worker_num_gpus): lower"
        " limits.max_size or denoiser.batching.max_batch_size (which also bounds limits.max_n),"
        " or raise denoiser.memory_budget_gb"
    )


def config_error(config) -> Optional[str]:
    """The check at config validation: only with a memory_budget_gb and a readable architecture."""
    budget = config.denoiser.memory_budget_gb
    model = memory_model(config.model.family)
    if budget is None or model is None:
        return None
    configs = model.read_configs(config.model.path)
    if configs is None:
        return None  # a builtin model: the replica checks at start with its real weights
    return budget_error(config, budget * GIB, configs[0])


def replica_error(config, workers: list[dict]) -> Optional[str]:
    """The check at replica start, with each worker's `memory` report (device total, weights,
    transformer config): the budget is memory_budget_gb, else the device's total memory x
    worker_num_gpus; on CPU without a budget nothing is checked."""
    dn = config.denoiser
    for info in workers:
        memory = info.get("memory") or {}
        total = memory.get("device_total_bytes")
        if dn.memory_budget_gb is not None:
            budget = dn.memory_budget_gb * GIB
            if total is not None and budget > total:
                return (
                    f"denoiser.memory_budget_gb ({dn.memory_budget_gb}) is more than the GPU's"
                    f" {total / GIB:.1f} GiB (rank {info.get('rank')})"
                )
        elif total is not None:
            budget = total * (dn.worker_num_gpus or 1.0)
        else:
            continue
        error = budget_error(config, budget, memory["transformer_config"], memory["weights_bytes"])
        if error:
            return f"{error} (checked at replica start on rank {info.get('rank')})"
    return None


def decode_warning(config, decoding, device: str) -> Optional[str]:
    """At VAEDecoder start, on a GPU: a warning when decoding the largest batch it admits
    (vae_decoder.batching.max_batch_size images of limits.max_size^2) needs more than the device
    has free now (such a batch is then decoded in halves). None on CPU or when it fits."""
    model = memory_model(config.model.family)
    vae = getattr(decoding, "vae", None)
    if device != "cuda" or model is None or vae is None:
        return None
    import torch

    free, _ = torch.cuda.mem_get_info()
    rows, size = config.vae_decoder.batching.max_batch_size, config.limits.max_size
    need = model.decode_bytes(dict(vae.config), rows, size, size, config.model.dtype)
    if need <= free:
        return None
    return (
        f"decoding vae_decoder.batching.max_batch_size ({rows}) images of limits.max_size"
        f" ({size}x{size}) needs about {need / GIB:.1f} GiB, more than the {free / GIB:.1f} GiB"
        " free on this GPU: such batches will be decoded in smaller parts (slower); lower"
        " vae_decoder.batching.max_batch_size or give the VAEDecoder more GPU memory"
    )
