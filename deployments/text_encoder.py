"""TextEncoder deployment: prompts -> prompt embeddings, batched.

Each replica loads its own tokenizers and encoders and uses them from one thread only: a fast
tokenizer shared between threads silently returns wrong token ids (tokenizers 0.23.3: 32 of 1,600
T5 calls and 41 of 1,600 CLIP calls from 8 threads, seen 2026-11-22), so this is a
correctness property, not only a crash guard.

A request run with classifier-free guidance also has its negative prompt encoded: the batch's
negative prompts go through the encoders as a second batch, as diffusers' `encode_prompt` does.

A batch that raises is run again prompt by prompt: only a prompt that fails alone gets a `Rejected`
(its client error, or an internal error carrying its request id; the log has the rest).
"""

from __future__ import annotations

import os
from typing import Any

from ray import serve

from deployments.batcher import StageBatcher
from deployments.batching import isolate_failures, rejected_alone
from deployments.errors import InvalidParameter
from deployments.payloads import Cancelled, EncodeRequest, PromptEmbeddings, Rejected
from deployments.runtime import (
    SerialExecutor,
    Stopwatch,
    load_role,
    logger,
    raise_if_error,
)
from deployments.stage import batching_options, open_progress

STAGE = "text_encoder"


def deployment_options(config) -> dict[str, Any]:
    return {**batching_options(config.text_encoder), "ray_actor_options": {"num_cpus": 1}}


@serve.deployment(name="TextEncoder")
class TextEncoder:
    def __init__(self, config):
        self._encoding, self._device = load_role(config, config.text_encoder, "TextEncoding")
        self._max_tokens = config.model.max_sequence_length
        self._executor = SerialExecutor("text-encoder")
        self._progress = open_progress(config, STAGE)
        self._batcher = StageBatcher.from_config(self._encode_batch, config.text_encoder.batching)

    async def encode(self, request: EncodeRequest) -> PromptEmbeddings | Rejected | Cancelled:
        with self._progress.metrics.in_stage():  # the queue depth gauge
            return raise_if_error(await self._batcher.submit(request))

    async def ready(self) -> dict:
        return {"stage": STAGE, "device": self._device, "pid": os.getpid()}

    async def _encode_batch(self, requests: list[EncodeRequest]) -> list:
        return await self._progress.run_batch(
            requests,
            [r.request_id for r in requests],
            len,
            lambda todo: self._executor.run(self._encode_isolated, todo),
            PromptEmbeddings,
        )

    def _encode_isolated(self, requests: list[EncodeRequest]) -> list:
        return isolate_failures(
            requests, self._encode_sync, lambda r, exc: rejected_alone(STAGE, r.request_id, exc)
        )

    def _encode_sync(self, requests: list[EncodeRequest]) -> list:
        """One tokenizer and encoder pass for the batch's prompts, then one for the negative
        prompts of the requests that run with classifier-free guidance: two batches, as diffusers'
        `encode_prompt` encodes prompts and negative prompts (a request alone then gets exactly the
        pipeline's embeddings)."""
        watch = Stopwatch("text_encoder")
        results: list = [None] * len(requests)
        prompts = self._tokenize(requests, range(len(requests)), "prompt", results)
        guided = [i for i, r in enumerate(requests) if r.negative_prompt is not None]
        negatives = self._tokenize(requests, guided, "negative_prompt", results)
        keep = [i for i in range(len(requests)) if results[i] is None]
        if keep:
            trace = (watch.trace(len(requests)),)
            ids, encoded = self._encode(prompts, keep)
            negative_rows = [i for i in keep if i in negatives[0]]
            negative = self._encode(negatives, negative_rows)[1] if negative_rows else None
            for row, i in enumerate(keep):
                extra = {}
                if i in negative_rows:
                    extra = _rows_of(negative, negative_rows.index(i), "negative_")
                results[i] = PromptEmbeddings(
                    request_id=requests[i].request_id,
                    input_ids=tuple(t[row].clone() for t in ids),
                    trace=trace,
                    **_rows_of(encoded, row, ""),
                    **extra,
                )
        logger.info(
            "text_encoder batch=%d negative=%d rejected=%d requests=%s %.3fs",
            len(requests),
            len(guided),
            len(requests) - len(keep),
            [r.request_id for r in requests],
            watch.trace(len(requests)).seconds,
        )
        return results

    def _tokenize(self, requests, members, param: str, results: list):
        """({request index: row}, tokens) of `param` for `members`; a text over the token limit
        gets its request a `Rejected` naming `param`."""
        members = list(members)
        if not members:
            return {}, None
        tokens = self._encoding.tokenize([getattr(requests[i], param) for i in members])
        for i, count in zip(members, tokens.token_counts):
            if count > self._max_tokens and results[i] is None:
                results[i] = Rejected(
                    requests[i].request_id,
                    InvalidParameter(
                        f"{param} is {count} tokens long; this model accepts at most"
                        f" {self._max_tokens} tokens",
                        param,
                    ),
                )
        return {i: row for row, i in enumerate(members)}, tokens

    def _encode(self, tokenized, members: list[int]):
        """(input ids, encoded) of the rows of `members`, in that order."""
        rows, tokens = tokenized
        index = [rows[i] for i in members]
        ids = tuple(t[index] for t in tokens.input_ids)
        kept = type(tokens)(input_ids=ids, token_counts=tuple(tokens.token_counts[r] for r in index))
        return ids, self._encoding.encode_prompt(kept)


def _rows_of(encoded, row: int, prefix: str) -> dict:
    """One row of each encoded tensor, cloned to the CPU (only this request's data is pickled),
    under its diffusers argument name (`negative_` + name for a negative prompt's)."""

    def take(tensor):
        return None if tensor is None else tensor[row : row + 1].cpu().clone()

    return {
        f"{prefix}prompt_embeds": take(encoded.prompt_embeds),
        f"{prefix}pooled_prompt_embeds": take(encoded.pooled_prompt_embeds),
        f"{prefix}prompt_attention_mask": take(encoded.prompt_attention_mask),
    }
