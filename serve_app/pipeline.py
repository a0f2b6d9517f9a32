"""One attempt at a request: the encode -> denoise -> decode chain of the request's model, used by
synchronous calls, streams and jobs alike.

The stage calls are chained by passing each `DeploymentResponse` straight into the next
`.remote()`, so embeddings and latents travel replica to replica through the object store and only
the encoded images come back here. Each served model has its own three stages: a request only ever
reaches its own model's replicas, so a batch never mixes models. Torch-free: this runs in the
ingress replica.
"""

from __future__ import annotations

from typing import Any

from deployments.payloads import EncodeRequest, GenerationSpec

STAGES = ("text_encoder", "denoiser", "vae_decoder")


class Pipeline:
    def __init__(self, chains: dict[str, Any]):
        """`chains`: model name -> its (text_encoder, denoiser, vae_decoder) handles, the default
        model first."""
        self.models = {name: dict(zip(STAGES, handles)) for name, handles in chains.items()}
        self.default_model = next(iter(self.models))

    @property
    def stages(self) -> dict[str, Any]:
        """Every stage handle, keyed `stage` for a one-model app and `model/stage` otherwise."""
        if len(self.models) == 1:
            return dict(self.models[self.default_model])
        return {f"{m}/{s}": h for m, stages in self.models.items() for s, h in stages.items()}

    async def run(self, encode_request: EncodeRequest, spec: GenerationSpec):
        """`EncodedImages`, or the `Rejected`/`Cancelled` value a stage answered instead; raises
        what a stage raised (a dead replica, a broken worker group, a failure)."""
        stages = self.models[spec.model or self.default_model]
        embeddings = stages["text_encoder"].encode.remote(encode_request)
        latents = stages["denoiser"].denoise.remote(embeddings, spec)
        return await stages["vae_decoder"].decode.remote(latents)
