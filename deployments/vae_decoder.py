"""VAEDecoder deployment: latents -> encoded images (png/jpeg/webp bytes), batched by image size."""

from __future__ import annotations

from ray import serve

from deployments.batching import decode_key, group_by, images_in, row_slices
from deployments.image_codec import encode_image
from deployments.payloads import EncodedImages, Latents, Rejected
from deployments.runtime import (
    SerialExecutor,
    Stopwatch,
    configure_batching,
    load_role,
    logger,
    raise_if_error,
)


@serve.deployment(name="VAEDecoder", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=16)
class VAEDecoder:
    def __init__(self, config):
        self._decoding, self._device = load_role(config, config.vae_decoder, "Decoding")
        self._executor = SerialExecutor("vae-decoder")
        configure_batching(self._decode_batch, config.vae_decoder.batching)

    async def decode(self, latents: Latents | Rejected) -> EncodedImages | Rejected:
        if isinstance(latents, Rejected):
            return latents
        return raise_if_error(await self._decode_batch(latents))

    async def ready(self) -> dict:
        return {"stage": "vae_decoder", "device": self._device}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01, batch_size_fn=images_in)
    async def _decode_batch(self, items: list[Latents]) -> list:
        return await self._executor.run(self._decode_sync, items)

    def _decode_sync(self, items: list[Latents]) -> list:
        import torch

        watch = Stopwatch("vae_decoder")
        images: list[list] = [[] for _ in items]
        for members in group_by(items, lambda item: decode_key(item.spec)):
            spec = items[members[0]].spec
            latents = torch.cat([items[i].latents for i in members])
            decoded = self._decoding.decode(latents, spec.height, spec.width)
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
                    width=spec.width,
                    height=spec.height,
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
