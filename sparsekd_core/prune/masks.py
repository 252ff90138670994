"""Pruning invariants that must hold through every later stage, and what a model really holds.

* **Unstructured (WANDA) masks.** A WANDA-pruned checkpoint stores its MLP matrices densely with zeros. Training
  would refill those zeros at the first optimizer step (AdamW moves every weight whose gradient is nonzero), so
  a "50% sparse" student would come out dense. ``unstructured_masks`` recovers the mask from the checkpoint (the
  zero entries of every dense MLP matrix of a model with a WANDA round in its record), and ``MaskGuard`` keeps it:
  gradients of masked entries are zeroed as they are computed (so clipping and AdamW's moments never see them)
  and the entries are set to zero again after every optimizer step (weight decay, numerical drift).
* **Structure (SVD ranks, removed blocks)** is held by the module shapes themselves; nothing to enforce.
* **Counting.** ``measured_compression`` counts the parameters and nonzero entries of the model it is given, so
  every figure a stage reports is of the model that was evaluated, not of the one that was pruned.
"""

from __future__ import annotations

import torch
from torch import nn

from .lowrank import compression_record, count_params, find_mlp_matrices

UNSTRUCTURED_METHODS = ("wanda",)


def is_unstructured(model: nn.Module) -> bool:
    """True if any pruning round in the model's record zeroed individual weights (WANDA)."""
    record = compression_record(model) or {}
    methods = {record.get("method")} | {h.get("method") for h in record.get("history", [])}
    return bool(methods & set(UNSTRUCTURED_METHODS))


@torch.no_grad()
def unstructured_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """{parameter name: bool mask [out, in] of the entries that must stay zero}; empty for a model without an
    unstructured round. Taken from the weights as they are now (the pruned checkpoint's zeros)."""
    if not is_unstructured(model):
        return {}
    return {f"{m.name}.weight": m.module.weight == 0 for m in find_mlp_matrices(model)
            if isinstance(m.module, nn.Linear)}


class MaskGuard:
    """Keep masked entries of parameters at exactly zero through training (see the module docstring).

    ``MaskGuard(model, masks)`` registers the gradient hooks; call ``apply()`` after every optimizer step and after
    loading weights; ``remove()`` drops the hooks. With no masks it does nothing. FSDP2-sharded parameters (DTensors)
    get their shard of the mask; their gradients are written by FSDP's reduce-scatter, outside autograd, where no
    hook sees them, so call ``mask_grads()`` before clipping (for other parameters the hooks have done it already).
    """

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]):
        params = dict(model.named_parameters())
        unknown = sorted(set(masks) - set(params))
        if unknown:
            raise ValueError(f"masks name parameters the model does not have: {unknown[:3]}")
        self.masked_entries = sum(int(mask.sum()) for mask in masks.values())
        self.pairs = [(params[name], _laid_out_like(mask, params[name])) for name, mask in masks.items()]
        self.handles = [p.register_hook(lambda g, m=mask: g.masked_fill(m, 0)) for p, mask in self.pairs
                        if not _is_sharded(p)]
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        for p, mask in self.pairs:
            p.masked_fill_(mask, 0)

    @torch.no_grad()
    def mask_grads(self) -> None:
        for p, mask in self.pairs:
            if p.grad is not None:
                p.grad.masked_fill_(mask, 0)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _is_sharded(p: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def _laid_out_like(mask: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``mask`` on ``p``'s device; for an FSDP2 parameter, this rank's shard of it (every rank holds the same
    mask, so each takes its shard locally: no communication)."""
    if not _is_sharded(p):
        return mask.to(p.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(mask.to(p.device), p.device_mesh, p.placements, src_data_rank=None)


def measured_compression(model: nn.Module) -> dict:
    """Counted on ``model`` as it is: MLP and total parameters, their nonzero entries, and the MLP reduction vs the
    dense model of the record (by nonzero entries for an unstructured model, by parameters otherwise).

    ``mlp_zero_fraction`` = zero entries / MLP parameters (0.5 for a 50% WANDA model, ~0 for a dense or SVD one).
    """
    counts = count_params(model)
    record = compression_record(model) or {}
    dense = record.get("mlp_params_dense", counts["mlp"])
    unstructured = is_unstructured(model)
    kept = counts["mlp_nonzero"] if unstructured else counts["mlp"]
    return {
        "mlp_params": counts["mlp"],
        "mlp_nonzero": counts["mlp_nonzero"],
        "total_params": counts["total"],
        "total_nonzero": counts["total_nonzero"],
        "mlp_params_dense": dense,
        "mlp_reduction": 1 - kept / dense if dense else 0.0,
        "mlp_zero_fraction": 1 - counts["mlp_nonzero"] / counts["mlp"] if counts["mlp"] else 0.0,
        "counted": "nonzero entries" if unstructured else "parameters",
    }
