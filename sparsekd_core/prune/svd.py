"""Structured low-rank pruning of MLP projections by truncated SVD (plain, or activation-aware/whitened).

For each MLP matrix W [m, n] (m = out, n = in):

* **plain** (the paper's method): W = U Σ Vᵀ, keep r components: u = U_r Σ_r [m, r], v = V_rᵀ [r, n].
  Minimises ‖W − uv‖_F (weight error).
* **whitened** (SVD-LLM style; the default when calibration data is given): with G = Σ_t x_t x_tᵀ the input's
  second moment over the calibration tokens and S the Cholesky factor of G + λI (λ = damping·mean diag G),
  A = W S = U Σ Vᵀ, u = U_r Σ_r, v = V_rᵀ S⁻¹. Since ‖(W − uv) X‖_F = ‖A − U_rΣ_rV_rᵀ‖_F, truncation minimises
  the output error on the calibration activations instead of the weight error.
* **re-truncation** of an already factored layer W = u₀v₀ (rank r₀): QR u₀ = Q_a R_a, QR (v₀S)ᵀ = Q_b R_b, SVD of
  the r₀×r₀ core R_a R_bᵀ = U_c Σ V_cᵀ gives W S = (Q_a U_c) Σ (Q_b V_c)ᵀ exactly, without forming an m×n matrix.

A matrix is factored only where r·(m + n) < m·n; otherwise it stays dense. Decompositions run in float64 on the
model's device (exact SVD; at these sizes a randomized SVD would save little and cost accuracy).

Rank selection: ``energy`` τ keeps the smallest r with Σ_{i≤r} σ_i² ≥ τ·Σ σ_i² per matrix (of the whitened
spectrum when whitened); ``target_reduction`` ρ assigns each matrix a cut s·w (w: its schedule weight, see
``schedule_weights``; schedule ``energy``: one energy threshold 1 − s for all) and solves s by bisection so that
1 − (MLP params after)/(dense MLP params) is within 0.5 pp of ρ (exact parameter counts, biases included).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..config import ConfigError, PruneConfig
from .lowrank import LowRankLinear, MlpMatrix, module_params, set_module
from .method import Calibration, Method, MethodResult, PruneInput, require_matrices
from .report import LayerReport

TOLERANCE = 0.005  # achieved reduction must be within 0.5 pp of the target


# ---------------------------------------------------------------------------------------------------------------- ranks


def schedule_weights(matrices: list[MlpMatrix], cfg: PruneConfig) -> list[float]:
    """Relative cut rate per matrix. uniform: all 1. tiered: edge blocks (the first and last
    max(1, round(tier_edge_fraction·L)) of L blocks) × tier_edge_weight, gate projections × tier_gate_weight."""
    if cfg.resolved_schedule != "tiered":
        return [1.0] * len(matrices)
    n_layers = max(m.layer for m in matrices) + 1
    edge = max(1, round(cfg.tier_edge_fraction * n_layers)) if cfg.tier_edge_fraction > 0 else 0
    weights = []
    for m in matrices:
        w = cfg.tier_edge_weight if (m.layer < edge or m.layer >= n_layers - edge) else 1.0
        weights.append(w * (cfg.tier_gate_weight if m.is_gate else 1.0))
    return weights


def _params_at(m: MlpMatrix, rank: int | None) -> int:
    """Parameters of matrix m at a rank (None = dense), bias included."""
    out_f, in_f = m.shape
    bias = out_f if _bias(m.module) is not None else 0
    return (out_f * in_f if rank is None else rank * (out_f + in_f)) + bias


def _bias(module: nn.Module):
    return module.u.bias if isinstance(module, LowRankLinear) else module.bias


def _rank_for_cut(m: MlpMatrix, cut: float) -> int | None:
    """Largest rank whose parameters are at most (1 − cut) of the dense matrix's; None = stay dense/unchanged."""
    out_f, in_f = m.shape
    if cut <= 0:
        return m.rank
    return _cap(m, max(1, int((1 - cut) * out_f * in_f // (out_f + in_f))))


def solve_ranks(matrices: list[MlpMatrix], rank_at: Callable[[int, float], int | None], target: float,
                mlp_dense: int, priority: list[float] | None = None) -> list[int | None]:
    """Ranks (None = dense) giving a total MLP reduction within 0.5 pp of ``target`` (relative to ``mlp_dense``).

    ``rank_at(i, s)``: matrix i's rank at cut level s ∈ [0, 1] (non-increasing in s; s = 1 → rank 1).
    ``priority``: which matrices take the last single-rank steps first (higher = first).
    """

    def reduction(ranks: list[int | None]) -> float:
        return 1 - sum(_params_at(m, r) for m, r in zip(matrices, ranks)) / mlp_dense

    def ranks_at(scale: float) -> list[int | None]:
        return [rank_at(i, scale) for i in range(len(matrices))]

    current = reduction([m.rank for m in matrices])
    if current >= target - TOLERANCE:
        raise ConfigError(f"prune.target_reduction={target}: the model is already at an MLP reduction of "
                          f"{current:.4f}; give a larger target than the current one")
    lo, hi = 0.0, 1.0
    if reduction(ranks_at(hi)) < target - TOLERANCE:
        raise ConfigError(f"prune.target_reduction={target}: unreachable even at rank 1 everywhere "
                          f"(max {reduction(ranks_at(hi)):.4f}); allowed: a smaller target")
    for _ in range(60):  # reduction(ranks_at(s)) is non-decreasing in s
        mid = (lo + hi) / 2
        if reduction(ranks_at(mid)) < target:
            lo = mid
        else:
            hi = mid
    ranks, ranks_hi = ranks_at(lo), ranks_at(hi)
    # Between the two bracketing levels some matrices step down; take those steps one at a time (highest priority
    # first) and keep the combination closest to the target.
    priority = priority or [1.0] * len(matrices)
    best, best_err = list(ranks), abs(reduction(ranks) - target)
    for i in sorted((i for i in range(len(ranks)) if ranks[i] != ranks_hi[i]), key=lambda i: -priority[i]):
        ranks[i] = ranks_hi[i]
        err = abs(reduction(ranks) - target)
        if err < best_err:
            best, best_err = list(ranks), err
    if best_err > TOLERANCE:
        raise ConfigError(f"prune.target_reduction={target}: closest achievable is {reduction(best):.4f} "
                          "(the matrices are too few/small for 0.5 pp steps)")
    return best


def plan_ranks(matrices: list[MlpMatrix], cfg: PruneConfig, mlp_dense: int,
               spectra: list[torch.Tensor] | None = None) -> list[int | None]:
    """Ranks for ``cfg.target_reduction`` under the schedule. uniform/tiered: matrix i gives up a fraction
    min(1, s·w_i) of its dense parameters; energy: every matrix keeps the rank holding a fraction 1 − s of its
    spectral energy (``spectra``: σ per matrix, of the whitened spectrum when whitened)."""
    if cfg.resolved_schedule == "energy":
        if spectra is None:
            raise ValueError("schedule 'energy' needs the spectra of all matrices")
        return solve_ranks(matrices, lambda i, s: _cap(matrices[i], energy_rank(spectra[i], 1 - s)),
                           cfg.target_reduction, mlp_dense)
    weights = schedule_weights(matrices, cfg)
    scale = 1 / min(weights)  # so that s = 1 cuts every matrix to rank 1
    return solve_ranks(matrices, lambda i, s: _rank_for_cut(matrices[i], s * scale * weights[i]),
                       cfg.target_reduction, mlp_dense, priority=weights)


def _cap(m: MlpMatrix, rank: int) -> int | None:
    """A proposed rank, limited to the current rank of a factored matrix; None where factoring would not pay."""
    if m.rank is not None:
        return min(rank, m.rank)
    return rank if rank * sum(m.shape) < m.shape[0] * m.shape[1] else None


def energy_rank(sigma: torch.Tensor, tau: float) -> int:
    """Smallest r with Σ_{i≤r} σ_i² ≥ τ·Σ σ_i² (σ sorted descending)."""
    cumulative = torch.cumsum(sigma.double() ** 2, 0)
    return int(torch.searchsorted(cumulative, tau * cumulative[-1]).clamp(max=len(sigma) - 1)) + 1


# ---------------------------------------------------------------------------------------------------------- decompose


def whitening_factor(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """Lower-triangular S [n, n] float64 with S Sᵀ = G + λI, λ = damping·mean(diag G) (raised ×10 until PD)."""
    g = gram.double()
    scale = g.diagonal().mean().clamp(min=1e-12)
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    for _ in range(6):
        factor, info = torch.linalg.cholesky_ex(g + damping * scale * eye)
        if int(info) == 0:
            return factor
        damping *= 10
    raise RuntimeError("whitening: the calibration second moment is not positive definite even with damping")


def spectrum(module: nn.Module, whitener: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of A = W·S (S = whitener, or I) in float64: (U [m, k], σ [k], Vᵀ [k, n]), σ descending.

    For a LowRankLinear (W = u v) it goes through QR of the factors, never forming W.
    """
    if isinstance(module, LowRankLinear):
        left, right = module.u.weight.double(), module.v.weight.double()
        if whitener is not None:
            right = right @ whitener
        q_a, r_a = torch.linalg.qr(left)  # [m, r0], [r0, r0]
        q_b, r_b = torch.linalg.qr(right.T)  # [n, r0], [r0, r0]
        u_c, sigma, vh_c = torch.linalg.svd(r_a @ r_b.T)
        return q_a @ u_c, sigma, vh_c @ q_b.T
    weight = module.weight.double()
    if whitener is not None:
        weight = weight @ whitener
    return torch.linalg.svd(weight, full_matrices=False)


def balance_factors(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale each rank-one component so that column i of u and row i of v have equal norms; u·v is unchanged.

    Why: with whitening, v = V_rᵀS⁻¹ has entries ~1e-3 and u = U_rΣ_r entries up to ~1e3 on SmolLM2. Adam moves
    every weight by ~lr per step whatever its scale, so distilling such factors at lr 5e-5 changes v by ~5% a step
    and the student diverged (validation ppl 57 → 1.4·10⁶ in 8 steps). Balanced factors have ordinary weight scales.
    """
    a = u.norm(dim=0)
    b = v.norm(dim=1)
    scale = torch.where((a > 0) & (b > 0), (b / a.clamp_min(1e-300)).sqrt(), torch.ones_like(a))
    return u * scale, v / scale[:, None]


def truncated_layer(module: nn.Module, rank: int, whitener: torch.Tensor | None = None,
                    factors: tuple | None = None) -> LowRankLinear:
    """The rank-``rank`` LowRankLinear for ``module`` (plain or whitened truncation; see the module docstring)."""
    u_full, sigma, vh = factors if factors is not None else spectrum(module, whitener)
    u = u_full[:, :rank] * sigma[:rank]
    v = vh[:rank]
    if whitener is not None:  # v = V_rᵀ S⁻¹: solve X S = V_rᵀ
        v = torch.linalg.solve_triangular(whitener, v, upper=False, left=False)
    u, v = balance_factors(u, v)
    ref = module.u.weight if isinstance(module, LowRankLinear) else module.weight
    bias = _bias(module)
    return LowRankLinear.from_factors(u.to(ref.dtype), v.to(ref.dtype), None if bias is None else bias.detach())


# -------------------------------------------------------------------------------------------------------------- prune


def calibration_needed(cfg: PruneConfig) -> Calibration | None:
    """Whitened SVD needs each matrix's input second moment; plain SVD needs no calibration."""
    return "input_gram" if cfg.use_whitening else None


@torch.no_grad()
def prune_svd(job: PruneInput) -> MethodResult:
    """Factor ``job.model``'s MLP matrices in place by truncated SVD as ``job.cfg`` says; one row per matrix.

    ``job.input_stats``: {matrix name: Σ x xᵀ [in, in]} — required when ``cfg.use_whitening``.
    """
    model, matrices, cfg = job.model, job.matrices, job.cfg
    whiten = cfg.use_whitening
    grams = job.input_stats
    if whiten and not grams:
        raise ValueError("whitened SVD needs the calibration second moments (input_stats)")
    require_matrices(matrices)

    def whitener_of(m: MlpMatrix) -> torch.Tensor | None:
        return whitening_factor(grams[m.name], cfg.damping) if whiten else None

    planned: list[int | None] | None = None
    if cfg.target_reduction is not None:
        # The energy schedule needs every spectrum before any rank is fixed (a second SVD per matrix later).
        spectra = ([spectrum(m.module, whitener_of(m))[1] for m in matrices]
                   if cfg.resolved_schedule == "energy" else None)
        planned = plan_ranks(matrices, cfg, job.mlp_params_dense, spectra)

    rows = []
    for i, m in enumerate(matrices):
        params_before, rank, kept = module_params(m.module), m.rank, 1.0
        if planned is None or planned[i] != m.rank:  # a matrix the plan leaves as it is needs no SVD
            whitener = whitener_of(m)
            factors = spectrum(m.module, whitener)
            sigma = factors[1]
            rank = planned[i] if planned is not None else _cap(m, energy_rank(sigma, cfg.energy))
            if rank is not None and rank != m.rank:
                set_module(model, m.name, truncated_layer(m.module, rank, whitener, factors))
                kept = float((sigma[:rank] ** 2).sum() / (sigma ** 2).sum())
        rows.append(LayerReport(m.name, m.layer, m.proj, m.shape, m.rank, rank, params_before,
                                module_params(model.get_submodule(m.name)), kept))
        if job.progress is not None:
            job.progress(1)

    return MethodResult(
        method="svd-whitened" if whiten else "svd",
        layers=rows,
        settings={"schedule": cfg.resolved_schedule, "target_reduction": cfg.target_reduction,
                  "energy": cfg.energy, "whiten": whiten, "damping": cfg.damping if whiten else None},
    )


SVD = Method(transform=prune_svd, calibration=calibration_needed)
