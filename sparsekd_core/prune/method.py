"""What a pruning method is handed and what it hands back (the contract ``pipeline.prune_model`` relies on).

A method only *transforms* the model in place. The pipeline does everything around it once: find the MLP
matrices, count parameters before and after, collect the calibration data the method asks for, time the round,
and write the report and the config record. So a method never calls ``find_mlp_matrices`` or ``count_params``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch import nn

from ..config import ConfigError, PruneConfig
from .lowrank import MlpMatrix
from .report import LayerReport

# What a method needs from the calibration tokens (None: nothing, no calibration pass):
#   tokens         the token ids [N, L] themselves (the method runs its own forward passes)
#   input_gram     per MLP matrix Σ_t x_t x_tᵀ [in, in] fp32 of its inputs
#   input_sq_norm  per MLP matrix Σ_t x_t² [in] fp32 (the diagonal of the above)
Calibration = Literal["tokens", "input_gram", "input_sq_norm"]


@dataclass
class PruneInput:
    """Everything a method may use. ``matrices`` are the model's MLP projections as found *before* the round (block
    order); a method that replaces or removes modules must not read them back afterwards."""

    model: nn.Module
    matrices: list[MlpMatrix]
    cfg: PruneConfig
    mlp_params_dense: int  # the round-0 (dense) model's MLP parameters: targets are relative to this
    calibration_ids: torch.Tensor | None = None  # [N, L] int64, when the method asked for calibration
    input_stats: dict[str, torch.Tensor] | None = None  # {matrix name: input_gram or input_sq_norm}, as asked
    log: Callable[[str], None] = print
    progress: Callable[[int], None] | None = None  # called with the units done (matrices, or sequences)


@dataclass
class MethodResult:
    """What the method did: the name the round is recorded under, one row per matrix it looked at (may be empty,
    e.g. depth), and its settings (spread into the report's summary and the round's history entry)."""

    method: str  # svd, svd-whitened, wanda, depth, ...
    layers: list[LayerReport]
    settings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """A registry entry: ``transform`` prunes in place; ``calibration(cfg)`` says which calibration data it needs."""

    transform: Callable[[PruneInput], MethodResult]
    calibration: Callable[[PruneConfig], Calibration | None]


def require_matrices(matrices: list[MlpMatrix]) -> None:
    """For methods that work on MLP matrices: fail with an actionable message when the model has none."""
    if not matrices:
        raise ConfigError("prune: no MLP projections found (expected names like model.layers.<i>.mlp.<proj>)")
