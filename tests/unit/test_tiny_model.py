"""The tiny checkpoint maker: real formats, loadable offline, deterministic for a seed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from deployments.tiny.store import build_tiny


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return build_tiny("flux", root / "a", seed=0), build_tiny("flux", root / "b", seed=0), root


def test_same_seed_gives_identical_files(two_builds):
    a, b, _ = two_builds
    assert digest(a) == digest(b)


def test_other_seed_gives_other_weights(two_builds):
    a, _, root = two_builds
    c = build_tiny("flux", root / "c", seed=1)
    da, dc = digest(a), digest(c)
    assert da["transformer/diffusion_pytorch_model.safetensors"] != dc["transformer/diffusion_pytorch_model.safetensors"]
    # tokenizers do not depend on the weight seed
    assert da["tokenizer/tokenizer.json"] == dc["tokenizer/tokenizer.json"]


def test_folder_has_real_formats_and_is_small(two_builds):
    a, _, _ = two_builds
    for name in (
        "model_index.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer.json",
        "tokenizer_2/spiece.model",
        "tokenizer_2/tokenizer.json",
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
    ):
        assert (a / name).is_file(), name
    index = json.loads((a / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["tokenizer_2"] == ["transformers", "T5TokenizerFast"]
    size = sum(p.stat().st_size for p in a.rglob("*") if p.is_file())
    assert size < 5_000_000, size


def test_loads_with_diffusers_and_tokenizes_sensibly(two_builds):
    import sentencepiece as spm
    from diffusers import FluxPipeline

    a, _, _ = two_builds
    pipe = FluxPipeline.from_pretrained(a)
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.tokenizer_2.model_max_length == 512
    clip = pipe.tokenizer("a photo of a cat").input_ids
    assert clip[0] == pipe.tokenizer.bos_token_id and clip[-1] == pipe.tokenizer.eos_token_id
    assert len(clip) < 12  # words of the corpus are merged, not spelled out byte by byte
    # the slow-format file agrees with the fast tokenizer on a corpus sentence
    sp = spm.SentencePieceProcessor(model_file=str(a / "tokenizer_2" / "spiece.model"))
    text = "A photo of a red fox in the snow"
    assert pipe.tokenizer_2(text).input_ids == sp.encode(text) + [pipe.tokenizer_2.eos_token_id]
    assert pipe.transformer.config.guidance_embeds is True
