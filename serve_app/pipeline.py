"""One attempt at a request: the encode -> denoise -> decode chain, used by synchronous calls,
streams and jobs alike.

The stage calls are chained by passing each `DeploymentResponse` straight into the next
`.remote()`, so embeddings and latents travel replica to replica through the object store and only
the encoded images come back here. Torch-free: this runs in the ingress replica.
"""

from __future__ import annotations

from deployments.payloads import EncodeRequest, GenerationSpec

STAGES = ("text_encoder", "denoiser", "vae_decoder")


class Pipeline:
    def __init__(self, text_encoder, denoiser, vae_decoder):
        self.stages = {"text_encoder": text_encoder, "denoiser": denoiser, "vae_decoder": vae_decoder}

    async def run(self, encode_request: EncodeRequest, spec: GenerationSpec):
        """`EncodedImages`, or the `Rejected`/`Cancelled` value a stage answered instead; raises
        what a stage raised (a dead replica, a broken worker group, a failure)."""
        embeddings = self.stages["text_encoder"].encode.remote(encode_request)
        latents = self.stages["denoiser"].denoise.remote(embeddings, spec)
        return await self.stages["vae_decoder"].decode.remote(latents)
