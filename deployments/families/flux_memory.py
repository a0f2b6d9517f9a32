"""Device memory of FLUX's denoise step and VAE decode: a rough linear model, torch-free (the config
check uses it before anything is loaded; a Denoiser replica re-checks with its real weights).

Denoise step (one transformer forward over a batch, the peak of a step):

    bytes = weights + rows x ceil(tokens / sp) x hidden x dtype_bytes x ACTIVATION_FACTOR + OVERHEAD
    tokens  = (height / 16) x (width / 16) image tokens + text tokens (model.max_sequence_length)
    hidden  = num_attention_heads x attention_head_dim  (3072 for FLUX.1)
    weights = params x dtype_bytes, params = (36 num_layers + 15 num_single_layers + 5) hidden^2
              + (in_channels + joint_attention_dim + pooled_projection_dim + 512 + 64) hidden
              (a double block holds 36 hidden^2 weights: two AdaLN-Zero (6 h^2 each), q/k/v/out of
              both streams (8 h^2), two MLPs (8 h^2 each); a single block 15 h^2; FLUX.1-dev: 11.9 B)
    sp      = the sequence-parallel degree: Ulysses splits the tokens (every rank holds all weights)

VAE decode (AutoencoderKL, the largest tensors are at full resolution with block_out_channels[0]):

    bytes = vae_weights + rows x height x width x block_out_channels[0] x dtype_bytes x DECODE_FACTOR
            + OVERHEAD

Source of the factors: peaks measured with `bench/bench_memory.py` over one prepare + step / one
decode, above the weights (FLUX.1-dev-sized random weights, bf16, diffusers 0.42.1, torch 2.11,
1 x H100, 2026-11-23; figures in docs/benchmarks.md, "Device memory"). Both are linear in the
unit: the step allocates 17.1 to 17.6 units (rows x tokens x hidden x bytes) from 512^2 x 1 to
2048^2 x 4, the decode 8.0 units per image (9.5 for one). The factors are the largest peak of
reserved memory with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (23.2 and 11.7 units),
rounded up. With the default allocator, blocks reserved but free can add up to half again under
pressure (a 2-image 2048^2 step ran out of memory under a cap of 1.5x its allocated peak): a batch
the estimate passes may then still run out of memory, and the replica splits it. OVERHEAD: the
CUDA context and library workspaces, which the allocator does not count (0.6 GiB measured).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

ACTIVATION_FACTOR = 24.0
DECODE_FACTOR = 12.0
OVERHEAD_BYTES = 1024**3
PIXELS_PER_TOKEN_SIDE = 16  # VAE 8x downsampling x 2x2 latent packing
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# FLUX.1-dev's own configs (transformer/config.json and vae/config.json on the hub): the
# architecture assumed for a hub id, whose config cannot be read before it is downloaded.
FLUX1_TRANSFORMER = {
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
}
FLUX1_VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 16}
VAE_PARAMS = 83_819_683  # FLUX.1's VAE (AutoencoderKL above, encoder and decoder)


def hidden_size(transformer: dict) -> int:
    return transformer["num_attention_heads"] * transformer["attention_head_dim"]


def transformer_params(transformer: dict) -> int:
    h = hidden_size(transformer)
    blocks = 36 * transformer["num_layers"] + 15 * transformer["num_single_layers"] + 5
    inputs = (
        transformer["in_channels"]
        + transformer["joint_attention_dim"]
        + transformer["pooled_projection_dim"]
        + 512  # timestep and guidance embedders (256 sinusoidal channels each)
        + 64  # output projection
    )
    return blocks * h * h + inputs * h


def denoise_bytes(
    transformer: dict,
    rows: int,
    height: int,
    width: int,
    dtype: str,
    text_tokens: int = 512,
    sp_degree: int = 1,
    weights_bytes: Optional[int] = None,
) -> int:
    """Peak device memory of one denoise step of `rows` images of height x width on one rank."""
    size = DTYPE_BYTES[dtype]
    weights = transformer_params(transformer) * size if weights_bytes is None else weights_bytes
    side = PIXELS_PER_TOKEN_SIDE
    tokens = (height // side) * (width // side) + text_tokens
    per_row = math.ceil(tokens / sp_degree) * hidden_size(transformer) * size * ACTIVATION_FACTOR
    return int(weights + rows * per_row + OVERHEAD_BYTES)


def decode_bytes(vae: dict, rows: int, height: int, width: int, dtype: str) -> int:
    """Peak device memory of one VAE decode of `rows` images of height x width."""
    size = DTYPE_BYTES[dtype]
    per_row = height * width * vae["block_out_channels"][0] * size * DECODE_FACTOR
    return int(VAE_PARAMS * size + rows * per_row + OVERHEAD_BYTES)


def read_configs(path: str) -> Optional[tuple[dict, dict]]:
    """(transformer config, VAE config) of a checkpoint, without loading it: read from a local
    folder, FLUX.1's for a hub id; None for a builtin model (checked at replica start)."""
    if path.startswith("builtin:"):
        return None
    folder = Path(path)
    if folder.is_absolute():
        try:
            return tuple(  # type: ignore[return-value]
                json.loads((folder / sub / "config.json").read_text()) for sub in ("transformer", "vae")
            )
        except (OSError, ValueError):
            return None  # a missing or unreadable folder is reported by the model checks
    return dict(FLUX1_TRANSFORMER), dict(FLUX1_VAE)
