"""TextEncoder deployment: prompts -> prompt embeddings, batched.

Each replica loads its own tokenizers and encoders and uses them from one thread only: a fast
tokenizer shared between threads silently returns wrong token ids (tokenizers 0.23.3: 32 of 1,600
T5 calls and 41 of 1,600 CLIP calls from 8 threads, seen 2026-11-22), so this is a
correctness property, not only a crash guard.

A request run with classifier-free guidance has its negative prompt encoded in the same pass, as
one more row of the batch.

A batch that raises is run again prompt by prompt: only a prompt that fails alone gets a `Rejected`
(its client error, or an internal error carrying its request id; the log has the rest).
"""

from __future__ import annotations

import os
from typing import Any

from ray import serve

from deployments.batching import isolate_failures, rejected_alone
from deployments.errors import InvalidParameter
from deployments.payloads import Cancelled, EncodeRequest, PromptEmbeddings, Rejected
from deployments.runtime import (
    SerialExecutor,
    Stopwatch,
    configure_batching,
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
        configure_batching(self._encode_batch, config.text_encoder.batching)

    async def encode(self, request: EncodeRequest) -> PromptEmbeddings | Rejected | Cancelled:
        with self._progress.metrics.in_stage():  # the queue depth gauge
            return raise_if_error(await self._encode_batch(request))

    async def ready(self) -> dict:
        return {"stage": STAGE, "device": self._device, "pid": os.getpid()}

    @serve.batch()
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
        """One tokenizer and encoder pass for the whole batch: every prompt, then the negative
        prompts of the requests that run with classifier-free guidance, as extra rows."""
        watch = Stopwatch("text_encoder")
        texts = [r.prompt for r in requests]
        negative_row: dict[int, int] = {}  # request -> row of its negative prompt
        for i, r in enumerate(requests):
            if r.negative_prompt is not None:
                negative_row[i] = len(texts)
                texts.append(r.negative_prompt)
        tokens = self._encoding.tokenize(texts)
        results: list = [None] * len(requests)
        for i, r in enumerate(requests):
            for param, row in (("prompt", i), ("negative_prompt", negative_row.get(i))):
                count = None if row is None else tokens.token_counts[row]
                if results[i] is None and count is not None and count > self._max_tokens:
                    results[i] = Rejected(
                        r.request_id,
                        InvalidParameter(
                            f"{param} is {count} tokens long; this model accepts at most "
                            f"{self._max_tokens} tokens",
                            param,
                        ),
                    )
        keep = [i for i in range(len(requests)) if results[i] is None]
        if keep:
            rows = keep + [negative_row[i] for i in keep if i in negative_row]
            position = {row: n for n, row in enumerate(rows)}
            ids = tuple(t[rows] for t in tokens.input_ids)
            kept = type(tokens)(input_ids=ids, token_counts=tuple(tokens.token_counts[r] for r in rows))
            encoded = self._encoding.encode_prompt(kept)
            trace = (watch.trace(len(requests)),)
            for i in keep:
                row, negative = position[i], position.get(negative_row.get(i, -1))
                results[i] = PromptEmbeddings(
                    request_id=requests[i].request_id,
                    input_ids=tuple(t[row].clone() for t in ids),
                    trace=trace,
                    **_rows_of(encoded, row, ""),
                    **(_rows_of(encoded, negative, "negative_") if negative is not None else {}),
                )
        logger.info(
            "text_encoder batch=%d negative=%d rejected=%d requests=%s %.3fs",
            len(requests),
            len(negative_row),
            len(requests) - len(keep),
            [r.request_id for r in requests],
            watch.trace(len(requests)).seconds,
        )
        return results


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
