"""WANDA (Sun et al., 2023): unstructured pruning by |W_ij|·‖X_j‖₂, compared within each output row.

For an MLP matrix W [out, in] and its calibration inputs X [tokens, in], the score of weight (i, j) is
|W_ij|·‖X_{:,j}‖₂. In every row the lowest-scored weights are set to zero. Each row gets ⌊s·in⌋ zeros and the
first (round(s·out·in) − out·⌊s·in⌋) rows one more, so every matrix has exactly round(s·out·in) pruned entries
(s = ``target_reduction``). Weights stay dense tensors (zeros stored), so only nonzero counts go down.
``pattern: 2:4`` instead zeros the 2 lowest-scored of every 4 consecutive inputs of each row (s = 0.5): the
semi-structured pattern NVIDIA GPUs run faster (``torch.sparse.to_sparse_semi_structured``); on a CPU it is
counted, not accelerated.
Weights that are already zero score 0 and are pruned first, so a later round with a larger s keeps earlier zeros.
"""

from __future__ import annotations

import torch

from ..config import ConfigError
from .lowrank import LowRankLinear
from .method import Method, MethodResult, PruneInput, require_matrices
from .report import LayerReport


def wanda_mask_2_4(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Boolean mask [out, in] of the entries to zero: in every group of 4 consecutive inputs of each row, the 2
    lowest-scored (NVIDIA's 2:4 semi-structured sparsity, Sun et al.'s N:M variant of WANDA); and the fraction of
    the score mass kept. Ties go to the earlier input, as in ``wanda_mask``."""
    out_f, in_f = weight.shape
    if in_f % 4:
        raise ConfigError(f"pattern=2:4 needs the input size to be a multiple of 4; a matrix has {in_f}")
    score = (weight.abs().float() * input_sq_norm.float().sqrt()).reshape(out_f, in_f // 4, 4)
    order = torch.argsort(score, dim=2, stable=True)
    mask = torch.zeros_like(score, dtype=torch.bool).scatter_(2, order[..., :2], True).reshape(out_f, in_f)
    score = score.reshape(out_f, in_f)
    kept = float(score[~mask].sum() / score.sum().clamp(min=1e-30))
    return mask, kept


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
        mask, kept = (wanda_mask_2_4(weight, job.input_stats[m.name]) if job.cfg.pattern == "2:4" else
                      wanda_mask(weight, job.input_stats[m.name], job.cfg.target_reduction))
        weight.masked_fill_(mask, 0)
        rows.append(LayerReport(m.name, m.layer, m.proj, m.shape, None, None, before,
                                int(torch.count_nonzero(weight)), kept))
        if job.progress is not None:
            job.progress(1)
    return MethodResult(method="wanda", layers=rows, settings={"target_reduction": job.cfg.target_reduction,
                                                               "pattern": job.cfg.pattern})


WANDA = Method(transform=prune_wanda, calibration=lambda cfg: "input_sq_norm")
