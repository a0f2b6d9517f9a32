"""A FLUX.1-dev-sized checkpoint with RANDOM weights, for timings on a GPU host with no hub access.

The configs are FLUX.1-dev's own (transformer 11.9 B params, CLIP-L, T5-XXL, the 16-channel VAE);
the weights are random and the tokenizers are the tiny ones (ids fit the real vocabularies). Its
images are noise: use it for speed, never quality. Weights are initialised on the GPU in bf16 and
written with save_pretrained, so the service loads them exactly as it would a real checkpoint.

  python bench/make_random_flux.py --out /tmp/flux-dev-random
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(out: Path, device: str) -> None:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from deployments.tiny.flux import FLUX_SCHEDULER
    from deployments.tiny.tokenizers import build_clip_tokenizer, build_t5_tokenizer

    clip_tok = build_clip_tokenizer(out / "tokenizer")  # tiny vocabularies: ids fit the real ones
    build_t5_tokenizer(out / "tokenizer_2")
    FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER).save_pretrained(out / "scheduler")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        parts = {
            # diffusers' defaults are FLUX.1-dev's config, but for the guidance embedding
            "transformer": FluxTransformer2DModel(guidance_embeds=True),
            "vae": AutoencoderKL(
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512),
                layers_per_block=2,
                latent_channels=16,
                norm_num_groups=32,
                sample_size=1024,
                scaling_factor=0.3611,
                shift_factor=0.1159,
                use_quant_conv=False,
                use_post_quant_conv=False,
            ),
            "text_encoder": CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                    hidden_act="quick_gelu", bos_token_id=clip_tok.bos_token_id,
                    eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id,
                )
            ),
            "text_encoder_2": T5EncoderModel(
                T5Config(
                    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                    num_heads=64, relative_attention_num_buckets=32, feed_forward_proj="gated-gelu",
                    dense_act_fn="gelu_new", is_gated_act=True,
                )
            ),
        }
    for name, model in parts.items():
        model.save_pretrained(out / name)
        del model
    index = {
        "_class_name": "FluxPipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    ns = parser.parse_args()
    out = Path(ns.out)
    if (out / "model_index.json").exists():
        print(f"{out} exists")
        return 0
    start = time.perf_counter()
    build(out, ns.device)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out}: {size / 1e9:.1f} GB in {time.perf_counter() - start:.0f} s (random weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
