"""SD3.5-medium- and PixArt-Sigma-sized checkpoints with RANDOM weights, for timings on a GPU host
with no hub access (see make_random_flux.py for FLUX.1-dev).

The configs are the real ones (SD3.5-medium: MMDiT-X 2.5 B params, CLIP-L, CLIP-G, T5-XXL, the
16-channel VAE, FlowMatch shift 3.0; PixArt-Sigma-XL-2-1024-MS: 0.6 B params, T5-XXL, the 4-channel
SDXL VAE, DPM-Solver++); the weights are random and the tokenizers the tiny ones (ids fit the real
vocabularies). Images are noise: use them for speed, never quality. Weights are made on the GPU
in bf16 and written with save_pretrained; the T5-XXL encoder is written once and linked into the
second folder.

  python bench/make_random_families.py --out /tmp/random     # /tmp/random/sd35-medium, /pixart-sigma
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def t5_xxl():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
            relative_attention_num_buckets=32, feed_forward_proj="gated-gelu",
            dense_act_fn="gelu_new", is_gated_act=True,
        )
    )


def clip(hidden: int, layers: int, heads: int, intermediate: int, act: str, tok):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=49408, hidden_size=hidden, intermediate_size=intermediate,
            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
            projection_dim=hidden, hidden_act=act, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
    )


def vae(latent_channels: int, scaling: float, shift):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=latent_channels,
        norm_num_groups=32,
        sample_size=1024,
        scaling_factor=scaling,
        shift_factor=shift,
        use_quant_conv=latent_channels == 4,
        use_post_quant_conv=latent_channels == 4,
    )


def save(parts: dict, out: Path, index: dict) -> None:
    for name, model in parts.items():
        model.save_pretrained(out / name)
    (out / "model_index.json").write_text(json.dumps(index, indent=2))


def build_sd35(out: Path, t5_dir: Path | None) -> None:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from deployments.tiny.tokenizers import build_clip_tokenizer, build_t5_tokenizer

    tok = build_clip_tokenizer(out / "tokenizer")
    build_clip_tokenizer(out / "tokenizer_2")
    build_t5_tokenizer(out / "tokenizer_3")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(out / "scheduler")
    parts = {
        # stabilityai/stable-diffusion-3.5-medium transformer/config.json
        "transformer": SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
            dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
        ),
        "vae": vae(16, 1.5305, 0.0609),
        "text_encoder": clip(768, 12, 12, 3072, "quick_gelu", tok),
        "text_encoder_2": clip(1280, 32, 20, 5120, "gelu", tok),
    }
    if t5_dir is None:
        parts["text_encoder_3"] = t5_xxl()
    save(parts, out, {
        "_class_name": "StableDiffusion3Pipeline",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
    if t5_dir is not None:
        os.symlink(t5_dir, out / "text_encoder_3")
    del parts
    torch.cuda.empty_cache()


def build_pixart(out: Path, t5_dir: Path) -> None:
    from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel

    from deployments.tiny.pixart import SIGMA_SCHEDULER
    from deployments.tiny.tokenizers import build_t5_tokenizer

    build_t5_tokenizer(out / "tokenizer")
    DPMSolverMultistepScheduler(**SIGMA_SCHEDULER).save_pretrained(out / "scheduler")
    parts = {
        # PixArt-alpha/PixArt-Sigma-XL-2-1024-MS transformer/config.json
        "transformer": PixArtTransformer2DModel(
            num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
            num_layers=28, cross_attention_dim=1152, sample_size=128, patch_size=2,
            norm_type="ada_norm_single", use_additional_conditions=False, caption_channels=4096,
            interpolation_scale=2,
        ),
        "vae": vae(4, 0.13025, None),
    }
    save(parts, out, {
        "_class_name": "PixArtSigmaPipeline",
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "PixArtTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
    os.symlink(t5_dir, out / "text_encoder")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    ns = parser.parse_args()
    import torch

    out = Path(ns.out)
    start = time.perf_counter()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(ns.device):
        t5_dir = out / "t5-xxl"
        if not (t5_dir / "config.json").exists():
            t5_xxl().save_pretrained(t5_dir)
        for name, build in (("sd35-medium", build_sd35), ("pixart-sigma", build_pixart)):
            if not (out / name / "model_index.json").exists():
                build(out / name, t5_dir)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and not p.is_symlink())
    print(f"wrote {out}: {size / 1e9:.1f} GB in {time.perf_counter() - start:.0f} s (random weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
