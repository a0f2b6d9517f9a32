"""TextEncoder deployment: prompts -> prompt embeddings, batched.

Each replica loads its own tokenizers and encoders and uses them from one thread only: a fast
tokenizer shared between threads silently returns wrong token ids (see DESIGN.md), so this is a
correctness property, not only a crash guard.
"""

from __future__ import annotations

from ray import serve

from deployments.payloads import EncodeRequest, PromptEmbeddings, Rejected
from deployments.runtime import (
    SerialExecutor,
    Stopwatch,
    configure_batching,
    load_role,
    logger,
    raise_if_error,
)
from serve_app.errors import InvalidParameter


@serve.deployment(name="TextEncoder", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=16)
class TextEncoder:
    def __init__(self, config):
        self._encoding, self._device = load_role(config, config.text_encoder, "TextEncoding")
        self._max_tokens = config.model.max_sequence_length
        self._executor = SerialExecutor("text-encoder")
        configure_batching(self._encode_batch, config.text_encoder.batching)

    async def encode(self, request: EncodeRequest) -> PromptEmbeddings | Rejected:
        return raise_if_error(await self._encode_batch(request))

    async def ready(self) -> dict:
        return {"stage": "text_encoder", "device": self._device}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _encode_batch(self, requests: list[EncodeRequest]) -> list:
        return await self._executor.run(self._encode_sync, requests)

    def _encode_sync(self, requests: list[EncodeRequest]) -> list:
        watch = Stopwatch("text_encoder")
        tokens = self._encoding.tokenize([r.prompt for r in requests])
        results: list = [None] * len(requests)
        keep = []
        for i, count in enumerate(tokens.token_counts):
            if count > self._max_tokens:
                results[i] = Rejected(
                    requests[i].request_id,
                    InvalidParameter(
                        f"prompt is {count} tokens long; this model accepts at most "
                        f"{self._max_tokens} tokens",
                        "prompt",
                    ),
                )
            else:
                keep.append(i)
        if keep:
            ids = tuple(t[keep] for t in tokens.input_ids)
            kept = type(tokens)(input_ids=ids, token_counts=tuple(tokens.token_counts[i] for i in keep))
            encoded = self._encoding.encode_prompt(kept)
            trace = (watch.trace(len(requests)),)
            pooled = encoded.pooled_prompt_embeds
            for row, i in enumerate(keep):
                results[i] = PromptEmbeddings(
                    request_id=requests[i].request_id,
                    prompt_embeds=encoded.prompt_embeds[row : row + 1].cpu().clone(),
                    pooled_prompt_embeds=None if pooled is None else pooled[row : row + 1].cpu().clone(),
                    input_ids=tuple(t[row].clone() for t in ids),
                    trace=trace,
                )
        logger.info(
            "text_encoder batch=%d rejected=%d requests=%s %.3fs",
            len(requests),
            len(requests) - len(keep),
            [r.request_id for r in requests],
            watch.trace(len(requests)).seconds,
        )
        return results
