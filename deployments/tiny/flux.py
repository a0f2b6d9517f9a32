"""A tiny FLUX checkpoint: random weights of tiny configs of the real diffusers/transformers classes.

The folder is a normal diffusers FLUX folder: `FluxPipeline.from_pretrained(out)` loads it with no
network. Shapes mirror FLUX.1-dev where it matters to serving: CLIP pooled + T5 sequence
embeddings, guidance embedding, a VAE with 8x downsampling (sizes are multiples of 16), 2x2 packed
latents, FLUX's flow-matching scheduler settings.
"""

from __future__ import annotations

import json
from pathlib import Path

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
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    out = Path(out)
    staging = out / "_tokenizers"
    clip_tok = build_clip_tokenizer(staging / "tokenizer")
    t5_tok = build_t5_tokenizer(staging / "tokenizer_2")

    torch.manual_seed(seed)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            hidden_act="quick_gelu",
            bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
        )
    )
    torch.manual_seed(seed + 1)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            dense_act_fn="gelu_new",
            is_gated_act=True,
            pad_token_id=t5_tok.pad_token_id,
            eos_token_id=t5_tok.eos_token_id,
        )
    )
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
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
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
    # The tokenizers' own files (vocab.json, merges.txt, spiece.model) next to tokenizer.json, so
    # slow tokenizer classes and transformers 4 can read the folder too, as with hub checkpoints.
    for sub in ("tokenizer", "tokenizer_2"):
        for f in (staging / sub).iterdir():
            (out / sub / f.name).write_bytes(f.read_bytes())
            f.unlink()
        (staging / sub).rmdir()
    staging.rmdir()
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())
    index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    index["tokenizer_2"] = ["transformers", "T5TokenizerFast"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out
