"""VAEDecoder deployment: latents -> encoded images (png/jpeg/webp bytes), batched by image size."""

from __future__ import annotations

import os
from typing import Any

from ray import serve

from deployments.batching import decode_key, group_by, images_in, row_slices
from deployments.image_codec import encode_image
from deployments.payloads import EncodedImages, Latents, passes_through
from deployments.runtime import (
    SerialExecutor,
    Stopwatch,
    configure_batching,
    load_role,
    logger,
    raise_if_error,
)
from deployments.stage import batching_options, open_progress

STAGE = "vae_decoder"


def deployment_options(config) -> dict[str, Any]:
    return {**batching_options(config.vae_decoder), "ray_actor_options": {"num_cpus": 1}}


@serve.deployment(name="VAEDecoder")
class VAEDecoder:
    def __init__(self, config):
        self._decoding, self._device = load_role(config, config.vae_decoder, "Decoding")
        self._executor = SerialExecutor("vae-decoder")
        self._progress = open_progress(config, STAGE)
        configure_batching(self._decode_batch, config.vae_decoder.batching)

    async def decode(self, latents: Latents | Any) -> EncodedImages | Any:
        """Encoded images, or the `Rejected`/`Cancelled` value that reached this stage instead."""
        if passes_through(latents):
            return latents
        return raise_if_error(await self._decode_batch(latents))

    async def ready(self) -> dict:
        return {"stage": STAGE, "device": self._device, "pid": os.getpid()}

    @serve.batch(batch_size_fn=images_in)
    async def _decode_batch(self, items: list[Latents]) -> list:
        return await self._progress.run_batch(
            items,
            [it.request_id for it in items],
            images_in,
            lambda todo: self._executor.run(self._decode_sync, todo),
            EncodedImages,
        )

    def _decode_sync(self, items: list[Latents]) -> list:
        import torch

        watch = Stopwatch("vae_decoder")
        images: list[list] = [[] for _ in items]
        for members in group_by(items, lambda item: decode_key(item.spec)):
            height, width = items[members[0]].spec.sampling.size_key
            latents = torch.cat([items[i].latents for i in members])
            decoded = self._decoding.decode(latents, height, width)
            for i, rows in zip(members, row_slices([items[i].spec.n for i in members])):
                images[i] = decoded[rows]
        trace = watch.trace(images_in(items))
        results = []
        for item, pictures in zip(items, images):
            spec = item.spec
            results.append(
                EncodedImages(
                    request_id=spec.request_id,
                    images=tuple(
                        encode_image(p, spec.output_format, spec.output_compression) for p in pictures
                    ),
                    output_format=spec.output_format,
                    width=spec.sampling.width,
                    height=spec.sampling.height,
                    trace=item.trace + (trace,),
                )
            )
        logger.info(
            "vae_decoder batch=%d images requests=%s %.3fs",
            images_in(items),
            [item.request_id for item in items],
            trace.seconds,
        )
        return results
