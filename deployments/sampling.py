"""How a request's images are sampled: one object from the request to the family.

Torch-free: the ingress builds it, stages pass it on, a family reads it. Later sampling settings
(negative prompt, LoRA) join it here, and with them its batch key.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class SamplingParams:
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    seeds: tuple[int, ...]  # one per image (row): image i is generated from seeds[i]

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def batch_key(self) -> tuple:
        """Rows share one transformer call only if every per-call setting is equal."""
        return (self.height, self.width, self.num_inference_steps, float(self.guidance_scale))

    @property
    def size_key(self) -> tuple[int, int]:
        """Rows share one VAE call only if their sizes are equal."""
        return (self.height, self.width)

    def with_seeds(self, seeds: tuple[int, ...]) -> "SamplingParams":
        return replace(self, seeds=tuple(seeds))

    @classmethod
    def merged(cls, params: list["SamplingParams"]) -> "SamplingParams":
        """One batch's params: the shared settings, every request's seeds in order."""
        first = params[0]
        if any(p.batch_key != first.batch_key for p in params):
            raise ValueError("requests with different batch keys cannot share a transformer call")
        return first.with_seeds(tuple(s for p in params for s in p.seeds))
