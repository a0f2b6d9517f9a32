"""A tiny SD3 checkpoint: random weights of tiny configs of the real diffusers/transformers classes.

The folder is a normal diffusers SD3 folder: `StableDiffusion3Pipeline.from_pretrained(out)` loads
it with no network. Shapes mirror SD3.5 where it matters to serving: CLIP-L and CLIP-G (pooled
projections and penultimate hidden states, side by side at T5's width) + T5 sequence embeddings,
a 16-channel VAE with a shift and a scaling factor, 2x2 patches (sizes are multiples of 16), SD3.5's
flow-matching scheduler (shift 3.0), 2 attention heads (Ulysses 2 divides them).
"""

from __future__ import annotations

from pathlib import Path

from deployments.tiny.components import finish_folder, tiny_clip, tiny_t5, tiny_vae
from deployments.tiny.tokenizers import build_clip_tokenizer, build_t5_tokenizer

# stabilityai/stable-diffusion-3.5-medium's scheduler/scheduler_config.json.
SD35_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)


def build_tiny_sd3(out: Path, seed: int = 0) -> Path:
    """Write a tiny SD3 checkpoint to `out` (which must not exist or be empty) and return it."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    out = Path(out)
    staging = out / "_tokenizers"
    clip_l_tok = build_clip_tokenizer(staging / "tokenizer")
    clip_g_tok = build_clip_tokenizer(staging / "tokenizer_2")
    t5_tok = build_t5_tokenizer(staging / "tokenizer_3")
    # CLIP-L and CLIP-G of 16 each: side by side they fill T5's 32 (the pipeline pads to T5's width).
    clip_l = tiny_clip(clip_l_tok, seed, hidden_size=16, with_projection=True)
    clip_g = tiny_clip(clip_g_tok, seed + 1, hidden_size=16, with_projection=True)
    t5 = tiny_t5(t5_tok, seed + 2)
    torch.manual_seed(seed + 3)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        out_channels=16,
        pos_embed_max_size=64,  # up to 64 patches a side: 1024 pixels
    )
    vae = tiny_vae(seed + 4, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD35_SCHEDULER),
        vae=vae,
        text_encoder=clip_l,
        tokenizer=clip_l_tok,
        text_encoder_2=clip_g,
        tokenizer_2=clip_g_tok,
        text_encoder_3=t5,
        tokenizer_3=t5_tok,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    classes = {"tokenizer": "CLIPTokenizer", "tokenizer_2": "CLIPTokenizer", "tokenizer_3": "T5TokenizerFast"}
    return finish_folder(out, staging, classes)
