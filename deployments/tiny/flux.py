"""A tiny FLUX checkpoint: random weights of tiny configs of the real diffusers/transformers classes.

The folder is a normal diffusers FLUX folder: `FluxPipeline.from_pretrained(out)` loads it with no
network. Shapes mirror FLUX.1-dev where it matters to serving: CLIP pooled + T5 sequence
embeddings, guidance embedding, a VAE with 8x downsampling (sizes are multiples of 16), 2x2 packed
latents, FLUX's flow-matching scheduler settings.
"""

from __future__ import annotations

from pathlib import Path

from deployments.tiny.components import finish_folder, tiny_clip, tiny_t5, tiny_vae
from deployments.tiny.tokenizers import build_clip_tokenizer, build_t5_tokenizer

# FLUX.1-dev's scheduler/scheduler_config.json.
FLUX_SCHEDULER = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    max_image_seq_len=4096,
    max_shift=1.15,
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
)


def build_tiny_flux(out: Path, seed: int = 0) -> Path:
    """Write a tiny FLUX checkpoint to `out` (which must not exist or be empty) and return it."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    out = Path(out)
    staging = out / "_tokenizers"
    clip_tok = build_clip_tokenizer(staging / "tokenizer")
    t5_tok = build_t5_tokenizer(staging / "tokenizer_2")

    clip = tiny_clip(clip_tok, seed)
    t5 = tiny_t5(t5_tok, seed + 1)
    torch.manual_seed(seed + 2)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    vae = tiny_vae(seed + 3, latent_channels=4, scaling_factor=0.3611, shift_factor=0.1159)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return finish_folder(out, staging, {"tokenizer": "CLIPTokenizer", "tokenizer_2": "T5TokenizerFast"})
