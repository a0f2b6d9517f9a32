"""Tokenizers for tiny checkpoints, trained here from a fixed corpus, saved in the real formats.

- CLIP: byte-level BPE. `tokenizers`' own BPE trainer gives different merges from run to run, so
  this file has a small deterministic trainer (most frequent pair first, ties broken by the pair
  itself). Written as `vocab.json` + `merges.txt` (what CLIP checkpoints ship) and `tokenizer.json`.
- T5: a sentencepiece unigram model (`spiece.model`, as T5 checkpoints ship) trained single-threaded,
  which makes it deterministic, plus `tokenizer.json`.
"""

from __future__ import annotations

import collections
import io
import json
import re
from pathlib import Path

from deployments.tiny.corpus import corpus_lines

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (adapted from openai/CLIP)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def train_clip_bpe(num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Deterministic byte-level BPE over the corpus, in CLIP's vocabulary layout."""
    byte_chars = _bytes_to_unicode()
    words: collections.Counter[tuple[str, ...]] = collections.Counter()
    for line in corpus_lines():
        for word in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", line.lower()):
            chars = [byte_chars[b] for b in word.encode("utf-8")]
            chars[-1] += "</w>"
            words[tuple(chars)] += 1
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: collections.Counter[tuple[str, ...]] = collections.Counter()
        for symbols, count in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    base = list(byte_chars.values())
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [CLIP_BOS, CLIP_EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def build_clip_tokenizer(out_dir: Path, num_merges: int = 400):
    """Train, save (vocab.json, merges.txt, tokenizer.json) and return the loaded tokenizer."""
    from transformers import CLIPTokenizer

    vocab, merges = train_clip_bpe(num_merges)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, sort_keys=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out_dir / "merges.txt").write_text("\n".join(lines) + "\n")
    return CLIPTokenizer.from_pretrained(out_dir)


def train_t5_sentencepiece(vocab_size: int) -> bytes:
    """A unigram sentencepiece model in T5's id layout (pad 0, eos 1, unk 2), as bytes."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        hard_vocab_limit=False,
        num_threads=1,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        minloglevel=2,
    )
    return model.getvalue()


def build_t5_tokenizer(out_dir: Path, vocab_size: int = 600):
    """Train, save (spiece.model, tokenizer.json) and return the loaded tokenizer."""
    from transformers import T5Tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "spiece.model").write_bytes(train_t5_sentencepiece(vocab_size))
    tokenizer = T5Tokenizer.from_pretrained(out_dir, model_max_length=T5_MAX_LENGTH)
    tokenizer.save_pretrained(out_dir)
    return T5Tokenizer.from_pretrained(out_dir)
