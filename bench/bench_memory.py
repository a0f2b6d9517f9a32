"""Device memory of FLUX's denoise step and VAE decode, measured, against the estimate the memory
budget check uses (`deployments/families/flux_memory.py`); then real out-of-memory errors, forced
with a per-process memory cap, through the same recovery code the stages run.

FLUX.1-dev-sized modules with RANDOM weights (diffusers' FluxTransformer2DModel with FLUX.1-dev's
config, the 16-channel VAE) are made on the GPU in bf16, no checkpoint needed, and driven through
this project's own `flux.Denoising.prepare/step` and `flux.Decoding.decode` (their objects are
assembled around the in-memory modules instead of loading a folder). For each (rows, size) the
peak is torch.cuda.max_memory_allocated during one prepare + step (one decode), above what was
allocated before (the weights); the factor is that peak over rows x tokens x hidden x 2 bytes
(rows x height x width x 128 x 2 bytes for the VAE), the unit of the estimate. The peak of
memory_reserved is printed too: it runs far higher (the caching allocator keeps freed blocks),
but the allocator releases those and retries before it raises an out of memory, so it is no need.

  python3 bench/bench_memory.py --out /tmp/memory.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DENOISE_SHAPES = [(1, 512), (4, 512), (1, 1024), (2, 1024), (4, 1024), (1, 2048), (2, 2048), (4, 2048)]
DECODE_SHAPES = [(1, 512), (4, 512), (1, 1024), (2, 1024), (4, 1024), (1, 2048), (2, 2048)]
GIB = 1024**3


def denoising(device: str):
    import torch
    from diffusers import FluxTransformer2DModel

    from deployments.families import flux
    from deployments.tiny.flux import FLUX_SCHEDULER

    torch.manual_seed(0)
    with torch.device(device):
        transformer = FluxTransformer2DModel(guidance_embeds=True).to(torch.bfloat16).eval()
    role = flux.Denoising.__new__(flux.Denoising)  # the role around an in-memory transformer
    role.device, role.parallel, role.max_sequence_length = torch.device(device), None, 512
    role.transformer, role.scheduler_config, role.vae_scale_factor = transformer, dict(FLUX_SCHEDULER), 8
    return role


def decoding(device: str):
    import torch
    from diffusers import AutoencoderKL
    from diffusers.image_processor import VaeImageProcessor

    from deployments.families import flux

    with torch.device(device):
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=16,
            norm_num_groups=32,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ).to(torch.bfloat16).eval()
    role = flux.Decoding.__new__(flux.Decoding)
    role.device, role.vae, role.vae_scale_factor = torch.device(device), vae, 8
    role.image_processor = VaeImageProcessor(vae_scale_factor=16)
    return role


def peak_above_base(fn) -> tuple[int, int, float]:
    """(peak reserved above the allocation before, peak allocated above it, seconds) of fn()."""
    import torch

    from deployments.oom import free_memory

    free_memory()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return torch.cuda.max_memory_reserved() - base, torch.cuda.max_memory_allocated() - base, seconds


def measure_denoise(role) -> list[dict]:
    from deployments.families import flux_memory as fm

    arch = dict(fm.FLUX1_TRANSFORMER)
    hidden = fm.hidden_size(arch)
    out = []
    for rows, size in DENOISE_SHAPES:
        inputs = role.dummy_inputs(rows, size, size, 2)

        def one_step():
            run = role.prepare(inputs)
            role.step(run)
            del run

        one_step()  # first call of a shape: kernels chosen, workspaces made
        reserved, allocated, seconds = peak_above_base(one_step)
        tokens = (size // 16) ** 2 + 512
        unit = rows * tokens * hidden * 2
        estimate = fm.denoise_bytes(arch, rows, size, size, "bfloat16") - fm.OVERHEAD_BYTES
        estimate -= fm.transformer_params(arch) * 2
        out.append(
            dict(rows=rows, size=size, peak_reserved_gib=reserved / GIB, peak_allocated_gib=allocated / GIB,
                 factor=allocated / unit, estimate_gib=estimate / GIB, seconds=seconds)
        )
        print(f"denoise rows={rows} {size}^2: +{allocated / GIB:.2f} GiB allocated"
              f" (+{reserved / GIB:.2f} reserved), factor {allocated / unit:.2f},"
              f" estimate {estimate / GIB:.2f} GiB, {seconds:.2f}s", flush=True)
    return out


def measure_decode(role) -> list[dict]:
    import torch

    from deployments.families import flux_memory as fm

    out = []
    for rows, size in DECODE_SHAPES:
        latents = torch.randn(rows, (size // 16) ** 2, 64, dtype=torch.bfloat16)
        role.decode(latents, size, size)
        reserved, allocated, seconds = peak_above_base(lambda: role.decode(latents, size, size))
        unit = rows * size * size * 128 * 2
        estimate = fm.decode_bytes(fm.FLUX1_VAE, rows, size, size, "bfloat16") - fm.OVERHEAD_BYTES
        estimate -= fm.VAE_PARAMS * 2
        out.append(
            dict(rows=rows, size=size, peak_reserved_gib=reserved / GIB, peak_allocated_gib=allocated / GIB,
                 factor=allocated / unit, estimate_gib=estimate / GIB, seconds=seconds)
        )
        print(f"decode rows={rows} {size}^2: +{allocated / GIB:.2f} GiB allocated"
              f" (+{reserved / GIB:.2f} reserved), factor {allocated / unit:.2f},"
              f" estimate {estimate / GIB:.2f} GiB, {seconds:.2f}s", flush=True)
    return out


def real_oom(denoise, decode, denoised: list[dict], decoded: list[dict]) -> dict:
    """Cap this process's memory so that a batch of 4 cannot fit but one of 2 can (by the peaks
    just measured): the step and the decode raise real CUDA OOMs, `forward_freeing` frees them
    (allocated memory back to what it was), and the batch then runs in halves (`run_halving`, as
    the VAE decoder does; the denoiser restarts its halves the same way)."""
    import torch

    from deployments.oom import forward_freeing, free_memory, run_halving

    def peak(table, rows, size):
        return next(r["peak_allocated_gib"] for r in table if (r["rows"], r["size"]) == (rows, size)) * GIB

    total = torch.cuda.get_device_properties(0).total_memory
    report: dict = {}
    dropped: list[int] = []

    def capped(name, table, size, run_rows):
        free_memory()
        base = torch.cuda.memory_allocated()
        cap = base + (peak(table, 2, size) + peak(table, 4, size)) / 2
        torch.cuda.set_per_process_memory_fraction(cap / total)
        calls: list[int] = []
        try:
            def attempt(rows):
                calls.append(len(rows))
                return forward_freeing(run_rows, rows, on_oom=lambda: dropped.append(1))

            try:
                attempt(list(range(4)))
                first = "fit (no OOM)"
            except torch.OutOfMemoryError as exc:
                first = f"OOM: {str(exc)[:100]}"
            freed = torch.cuda.memory_allocated() - base
            results = run_halving(attempt, range(4), name)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
        report[name] = {
            "cap_above_base_gib": (cap - base) / GIB,
            "batch_of_4": first,
            "allocated_above_base_after_oom_mib": freed / 1024**2,
            "calls_in_halving": calls[1:],
            "rows_done": sum(r is not None for r in results),
        }

    def denoise_rows(rows):
        run = denoise.prepare(denoise.dummy_inputs(len(rows), 2048, 2048, 2))
        denoise.step(run)
        return [denoise.finish(run)] * len(rows)

    latents = torch.randn(4, (1024 // 16) ** 2, 64, dtype=torch.bfloat16)

    def decode_rows(rows):
        return decode.decode(latents[rows[0] : rows[-1] + 1], 1024, 1024)

    capped("denoise_2048", denoised, 2048, denoise_rows)
    capped("decode_1024", decoded, 1024, decode_rows)
    report["batches_dropped_on_oom"] = len(dropped)
    print("real OOM:", json.dumps(report), flush=True)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    ns = parser.parse_args()
    import torch

    started = time.perf_counter()
    denoise = denoising("cuda")
    decode = decoding("cuda")
    result = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "weights_gib": torch.cuda.memory_allocated() / GIB,
        "context_gib": (torch.cuda.mem_get_info()[1] - torch.cuda.mem_get_info()[0]
                        - torch.cuda.memory_reserved()) / GIB,
    }
    print(json.dumps(result), flush=True)
    result["denoise"] = measure_denoise(denoise)
    result["decode"] = measure_decode(decode)
    result["real_oom"] = real_oom(denoise, decode, result["denoise"], result["decode"])
    result["seconds"] = time.perf_counter() - started
    if ns.out:
        Path(ns.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
