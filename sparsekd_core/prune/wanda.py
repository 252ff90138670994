"""WANDA (Sun et al., 2023): unstructured pruning by |W_ij|·‖X_j‖₂, compared within each output row.

For an MLP matrix W [out, in] and its calibration inputs X [tokens, in], the score of weight (i, j) is
|W_ij|·‖X_{:,j}‖₂. In every row the lowest-scored weights are set to zero. Each row gets ⌊s·in⌋ zeros and the
first (round(s·out·in) − out·⌊s·in⌋) rows one more, so every matrix has exactly round(s·out·in) pruned entries
(s = ``target_reduction``). Weights stay dense tensors (zeros stored), so only nonzero counts go down.
Weights that are already zero score 0 and are pruned first, so a later round with a larger s keeps earlier zeros.
"""

from __future__ import annotations

import torch

from ..config import ConfigError
from .lowrank import LowRankLinear
from .method import Method, MethodResult, PruneInput, require_matrices
from .report import LayerReport


def wanda_mask(weight: torch.Tensor, input_sq_norm: torch.Tensor, sparsity: float) -> tuple[torch.Tensor, float]:
    """Boolean mask [out, in] of the entries to zero (exactly round(sparsity·out·in)), and the fraction of the
    score mass kept. ``input_sq_norm`` [in] = Σ_t x_tj²."""
    out_f, in_f = weight.shape
    score = weight.abs().float() * input_sq_norm.float().sqrt()
    total = round(sparsity * out_f * in_f)
    per_row = total // out_f
    extra = total - per_row * out_f  # rows 0 .. extra-1 prune one more
    order = torch.argsort(score, dim=1, stable=True)
    count = torch.full((out_f, 1), per_row, device=weight.device)
    count[:extra] += 1
    position = torch.arange(in_f, device=weight.device).expand(out_f, in_f)
    mask = torch.zeros_like(weight, dtype=torch.bool).scatter_(1, order, position < count)
    kept = float(score[~mask].sum() / score.sum().clamp(min=1e-30))
    return mask, kept


@torch.no_grad()
def prune_wanda(job: PruneInput) -> MethodResult:
    """Zero ``cfg.target_reduction`` of every MLP matrix of ``job.model`` in place by WANDA scores; one row per matrix.

    ``job.input_stats``: {matrix name: Σ_t x_t² [in]} (calibration ``input_sq_norm``).
    """
    require_matrices(job.matrices)
    if any(isinstance(m.module, LowRankLinear) for m in job.matrices):
        raise ConfigError("prune.method='wanda': the model has low-rank (SVD-pruned) layers; WANDA prunes dense "
                          "matrices only — start from a dense model or its dense export")
    rows = []
    for m in job.matrices:
        weight = m.module.weight
        before = int(torch.count_nonzero(weight))
        mask, kept = wanda_mask(weight, job.input_stats[m.name], job.cfg.target_reduction)
        weight.masked_fill_(mask, 0)
        rows.append(LayerReport(m.name, m.layer, m.proj, m.shape, None, None, before,
                                int(torch.count_nonzero(weight)), kept))
        if job.progress is not None:
            job.progress(1)
    return MethodResult(method="wanda", layers=rows, settings={"target_reduction": job.cfg.target_reduction})


WANDA = Method(transform=prune_wanda, calibration=lambda cfg: "input_sq_norm")
