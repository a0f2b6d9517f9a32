"""A tiny PixArt-Sigma checkpoint: random weights of tiny configs of the real diffusers/transformers
classes.

The folder is a normal diffusers PixArt-Sigma folder: `PixArtSigmaPipeline.from_pretrained(out)`
loads it with no network. Shapes mirror PixArt-Sigma where it matters to serving: T5 sequence
embeddings with their attention mask, a transformer with learned sigma (out_channels = 2 x
in_channels) and no additional conditions, a 4-channel VAE (sizes are multiples of 16 with 2x2
patches), Sigma's DPM-Solver++ multistep scheduler, 2 attention heads.
"""

from __future__ import annotations

from pathlib import Path

from deployments.tiny.components import finish_folder, tiny_t5, tiny_vae
from deployments.tiny.tokenizers import build_t5_tokenizer

# PixArt-alpha/PixArt-Sigma-XL-2-1024-MS's scheduler/scheduler_config.json (the settings that differ
# from DPMSolverMultistepScheduler's defaults, and the ones the serving path depends on).
SIGMA_SCHEDULER = dict(
    algorithm_type="dpmsolver++",
    beta_end=0.02,
    beta_schedule="linear",
    beta_start=0.0001,
    lower_order_final=True,
    num_train_timesteps=1000,
    prediction_type="epsilon",
    solver_order=2,
    solver_type="midpoint",
    timestep_spacing="linspace",
    use_karras_sigmas=False,
)


def build_tiny_pixart(out: Path, seed: int = 0) -> Path:
    """Write a tiny PixArt-Sigma checkpoint to `out` (must not exist or be empty); return it."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    out = Path(out)
    staging = out / "_tokenizers"
    t5_tok = build_t5_tokenizer(staging / "tokenizer")
    t5 = tiny_t5(t5_tok, seed)
    torch.manual_seed(seed + 1)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        norm_num_groups=4,
        cross_attention_dim=16,
        sample_size=32,
        patch_size=2,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
        caption_channels=32,
    )
    vae = tiny_vae(seed + 2, latent_channels=4, scaling_factor=0.13025)
    pipe = PixArtSigmaPipeline(
        tokenizer=t5_tok,
        text_encoder=t5,
        vae=vae,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(**SIGMA_SCHEDULER),
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return finish_folder(out, staging, {"tokenizer": "T5TokenizerFast"})
