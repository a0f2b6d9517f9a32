"""Classifier-free guidance for the families that use it (SD3, PixArt), CFG-parallel included.

diffusers' pipelines run both guidance branches as one batch: the transformer's input is
`cat([latents, latents])` with `cat([negative_embeds, embeds])`, and its output is split back with
`.chunk(2)` and combined as `uncond + guidance_scale * (text - uncond)`. CFG-parallel (xDiT's
`cfg_degree` 2) puts the unconditional branch on CFG rank 0 and the conditional one on CFG rank 1:
each rank runs half the batch and the two predictions are all-gathered over the CFG group, so every
rank ends with the same guided prediction. A row's result does not depend on the other rows, nor on
how the branches were placed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping, Optional, Sequence

from deployments.families.base import ParallelContext

if TYPE_CHECKING:
    import torch

# forward(hidden_states, branch_kwargs) -> the transformer's prediction for those rows.
Forward = Callable[["torch.Tensor", Mapping[str, "torch.Tensor"]], "torch.Tensor"]


def cfg_degree(parallel: Optional[ParallelContext]) -> int:
    return 1 if parallel is None else parallel.cfg_degree


def guided_prediction(
    forward: Forward,
    latents: "torch.Tensor",
    cond: Mapping[str, "torch.Tensor"],
    uncond: Optional[Mapping[str, "torch.Tensor"]],
    guidance_scale: float,
    parallel: Optional[ParallelContext] = None,
) -> "torch.Tensor":
    """The guided prediction for `latents` (rows, ...). `cond`/`uncond`: the per-row tensors a
    branch differs by (embeddings, masks), keyed by the transformer's argument names; `uncond` None
    means no guidance (one branch). Every CFG rank returns the same full prediction."""
    import torch

    if uncond is None:
        return forward(latents, cond)
    if cfg_degree(parallel) == 1:
        both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
        pred_uncond, pred_text = forward(torch.cat([latents, latents]), both).chunk(2)
    else:
        from xfuser.core.distributed import get_cfg_group, get_classifier_free_guidance_rank

        branch = uncond if get_classifier_free_guidance_rank() == 0 else cond
        pred = forward(latents, branch)
        pred_uncond, pred_text = get_cfg_group().all_gather(pred.contiguous(), separate_tensors=True)
    return pred_uncond + guidance_scale * (pred_text - pred_uncond)


def guided_rows(
    forward: Callable[[torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor],
    latents: Sequence[torch.Tensor],
    cond: Sequence[Mapping[str, torch.Tensor]],
    uncond: Sequence[Optional[Mapping[str, torch.Tensor]]],
    guidance_scales: Sequence[float],
) -> list[torch.Tensor]:
    """Each row's guided prediction from ONE `forward` call: `latents[i]` (1, ...) with the tensors
    its branches differ by (`cond[i]`, and `uncond[i]` or None for a row without CFG, each keyed
    by the transformer's argument names, batch dimension 1). The call's rows are laid out as
    `guided_prediction` lays out a batch, every unconditional branch first, then every conditional
    one: `[uncond of the CFG rows..., cond of all rows...]`; a row with CFG is combined as the
    pipelines do, `uncond + guidance_scale * (text - uncond)`, with its own scale."""
    import torch

    guided = [i for i, u in enumerate(uncond) if u is not None]
    order = [(i, uncond[i]) for i in guided] + list(enumerate(cond))
    batched = {k: torch.cat([b[k] for _, b in order]) for k in cond[0]}
    pred = forward(torch.cat([latents[i] for i, _ in order]), batched)
    preds = []
    for i in range(len(cond)):
        pred_text = pred[len(guided) + i : len(guided) + i + 1]
        if uncond[i] is None:
            preds.append(pred_text)
            continue
        j = guided.index(i)
        pred_uncond = pred[j : j + 1]
        preds.append(pred_uncond + guidance_scales[i] * (pred_text - pred_uncond))
    return preds
