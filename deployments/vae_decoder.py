"""VAEDecoder deployment: latents -> encoded images (png/jpeg/webp bytes), batched by image size.

The decode runs in batches on the stage's one model thread; each request's images are then encoded
on a small pool of threads (`vae_decoder.encode_threads`; PIL releases the GIL while it compresses),
so the next batch decodes while the last one's images are still being compressed, and an image
that fails to encode fails only its own request.

Failures stay with their request: a decode that runs out of device memory runs again in halves
(an image that does not fit alone fails its request with a 400 naming `size`), and a batch that
raises anything else is run again item by item, so only the item that fails alone gets a
`Rejected` (its client error, or an internal error carrying its request id; the log has the rest).
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ray import serve

from deployments.batcher import StageBatcher
from deployments.batching import decode_key, group_by, images_in, isolate_failures, rejected_alone, row_slices
from deployments.image_codec import encode_image
from deployments.memory_budget import decode_warning
from deployments.oom import forward_freeing, inject_oom, insufficient_memory, run_halving
from deployments.payloads import EncodedImages, GenerationSpec, Latents, Rejected, StageTrace, passes_through
from deployments.runtime import (
    SerialExecutor,
    Stopwatch,
    load_role,
    logger,
    raise_if_error,
)
from deployments.stage import batching_options, open_progress

STAGE = "vae_decoder"


@dataclass(frozen=True)
class Decoded:
    """A request's decoded images (PIL), on their way to the encoding pool."""

    spec: GenerationSpec
    images: tuple
    trace: tuple[StageTrace, ...]

    @property
    def request_id(self) -> str:
        return self.spec.request_id


def deployment_options(config) -> dict[str, Any]:
    return {**batching_options(config.vae_decoder), "ray_actor_options": {"num_cpus": 1}}


@serve.deployment(name="VAEDecoder")
class VAEDecoder:
    def __init__(self, config):
        self._decoding, self._device = load_role(config, config.vae_decoder, "Decoding")
        warning = decode_warning(config, self._decoding, self._device)
        if warning:
            logger.warning("%s", warning)
        self._executor = SerialExecutor("vae-decoder")
        self._encoder = ThreadPoolExecutor(config.vae_decoder.encode_threads, thread_name_prefix="encode")
        self._png_level = config.vae_decoder.png_compress_level
        self._progress = open_progress(config, STAGE)
        self._batcher = StageBatcher.from_config(self._decode_batch, config.vae_decoder.batching, images_in)

    async def decode(self, latents: Latents | Any) -> EncodedImages | Any:
        """Encoded images, or the `Rejected`/`Cancelled` value that reached this stage instead."""
        if passes_through(latents):
            return latents
        with self._progress.metrics.in_stage():  # the queue depth gauge
            decoded = raise_if_error(await self._batcher.submit(latents))
            return await self._encode(decoded) if isinstance(decoded, Decoded) else decoded

    async def _encode(self, decoded: Decoded) -> EncodedImages | Rejected:
        spec, loop = decoded.spec, asyncio.get_running_loop()
        watch = Stopwatch("encode")
        try:
            images = await asyncio.gather(
                *(
                    loop.run_in_executor(
                        self._encoder, encode_image, p, spec.output_format, spec.output_compression, self._png_level
                    )
                    for p in decoded.images
                )
            )
        except Exception as exc:  # noqa: BLE001 - this request's own failure
            return rejected_alone("encode", spec.request_id, exc)
        return EncodedImages(
            request_id=spec.request_id,
            images=tuple(images),
            output_format=spec.output_format,
            width=spec.sampling.width,
            height=spec.sampling.height,
            trace=decoded.trace + (watch.trace(len(images)),),
        )

    async def ready(self) -> dict:
        return {"stage": STAGE, "device": self._device, "pid": os.getpid()}

    async def _decode_batch(self, items: list[Latents]) -> list:
        return await self._progress.run_batch(
            items,
            [it.request_id for it in items],
            images_in,
            lambda todo: self._executor.run(self._decode_isolated, todo),
            Decoded,
        )

    def _decode_isolated(self, items: list[Latents]) -> list:
        return isolate_failures(
            items, self._decode_sync, lambda item, exc: rejected_alone(STAGE, item.request_id, exc)
        )

    def _decode_rows(self, latents, height: int, width: int) -> list:
        inject_oom("VAE decode", latents.shape[0], height, width)
        return self._decoding.decode(latents, height, width)

    def _decode_sync(self, items: list[Latents]) -> list:
        import torch

        watch = Stopwatch("vae_decoder")
        images: list = [[] for _ in items]
        for members in group_by(items, lambda item: decode_key(item.spec)):
            height, width = items[members[0]].spec.sampling.size_key
            latents = torch.cat([items[i].latents for i in members])
            decoded = run_halving(
                lambda rows: forward_freeing(
                    self._decode_rows, latents[rows[0] : rows[-1] + 1], height, width
                ),
                range(latents.shape[0]),
                f"vae_decoder {width}x{height}",
            )
            for i, rows in zip(members, row_slices([items[i].spec.n for i in members])):
                images[i] = decoded[rows]
                if any(p is None for p in images[i]):  # an image did not fit alone
                    error = insufficient_memory("VAE decoder", width, height)
                    images[i] = Rejected(items[i].request_id, error)
        trace = watch.trace(images_in(items))
        results = []
        for item, pictures in zip(items, images):
            if isinstance(pictures, Rejected):
                results.append(pictures)
                continue
            results.append(Decoded(spec=item.spec, images=tuple(pictures), trace=item.trace + (trace,)))
        logger.info(
            "vae_decoder batch=%d images requests=%s %.3fs",
            images_in(items),
            [item.request_id for item in items],
            trace.seconds,
        )
        return results
