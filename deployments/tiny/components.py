"""Tiny random-weight parts shared by the tiny checkpoints: CLIP and T5 text encoders of the real
transformers classes, a small VAE, and the step that turns a saved pipeline into a folder every
tokenizer class can read."""

from __future__ import annotations

import json
from pathlib import Path


def tiny_clip(tokenizer, seed: int, hidden_size: int = 32, with_projection: bool = False):
    """A 2-layer CLIP text encoder (`CLIPTextModelWithProjection` for SD3's pooled projections)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden_size,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def tiny_t5(tokenizer, seed: int):
    """A 2-layer T5 encoder (d_model 32), gated-gelu as T5 v1.1."""
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            dense_act_fn="gelu_new",
            is_gated_act=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )


def tiny_vae(seed: int, latent_channels: int, scaling_factor: float, shift_factor=None):
    """An AutoencoderKL with 8x downsampling (four blocks) and a few thousand weights."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def finish_folder(out: Path, staging: Path, tokenizer_classes: dict[str, str]) -> Path:
    """After `save_pretrained(out)`: the tokenizers' own files (vocab.json, merges.txt,
    spiece.model) next to tokenizer.json, so slow tokenizer classes and transformers 4 can read the
    folder too, and model_index.json naming the classes hub checkpoints name."""
    for sub in tokenizer_classes:
        for f in (staging / sub).iterdir():
            (out / sub / f.name).write_bytes(f.read_bytes())
            f.unlink()
        (staging / sub).rmdir()
    staging.rmdir()
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())
    for sub, cls in tokenizer_classes.items():
        index[sub] = ["transformers", cls]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out
