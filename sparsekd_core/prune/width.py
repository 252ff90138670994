"""Width pruning (Minitron-style): remove the least important intermediate neurons of every MLP.

An MLP computes ``down(h)`` with h = act(gate(x)) ⊙ up(x) [tokens, I], the input of ``down_proj``. The importance
of neuron j of a block is its mean absolute activation over the calibration tokens

    a_j = (1 / T) Σ_t |h_tj|

(the activation-based importance of Minitron, Muralidharan et al., 2024: one forward pass, no gradients). Removing
neuron j deletes row j of ``gate_proj`` and ``up_proj`` (rows j and I + j of Phi-3's fused ``gate_up_proj``) and
column j of ``down_proj``; the block's output loses exactly down[:, j]·h_j, so a neuron that is nearly silent on
the calibration data is one ``down_proj`` barely reads. Kept neurons keep their order; biases are kept with them.

How many neurons each block keeps (``cfg.resolved_schedule``):

* **uniform** (default): every block keeps the same number w. The result is the base architecture with
  ``config.intermediate_size = w``: a standard checkpoint that stock ``transformers`` loads, no custom code.
* **tiered**: block b keeps min(I_b, ⌊(1 − min(1, s·w_b/min w))·I_max⌋) neurons (w_b: ``tier_edge_weight`` for
  the first and last blocks, 1 elsewhere, as SVD's tiered schedule; I_max: the widest block now). Per-block sizes:
  the checkpoint records them (``widths``) and its modeling code builds them (``trust_remote_code``), as factored
  SVD checkpoints do; ``config.intermediate_size`` is the widest block.

Accounting is exact (``parameters()``, biases included): w (uniform) or s (tiered, by bisection, then single
steps, middle blocks first) is solved so that the MLP reduction vs the dense model is within 0.5 pp of
``target_reduction``. Targets are cumulative: a later round only cuts further, never regrows a block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ConfigError, PruneConfig
from .calibration import forward_batches
from .lowrank import NEURON_ROWS, LowRankLinear, MlpMatrix, module_params, set_module
from .method import Method, MethodResult, PruneInput, require_matrices
from .report import LayerReport
from .svd import TOLERANCE, schedule_weights


@dataclass
class MlpBlock:
    """One block's MLP: the projections whose output rows are its neurons, and ``down_proj`` (columns)."""

    layer: int
    rows: list[MlpMatrix]  # gate_proj and up_proj, or Phi-3's gate_up_proj
    down: MlpMatrix

    @property
    def width(self) -> int:
        """The intermediate size I of the block now."""
        return self.down.module.in_features

    def params_at(self, width: int) -> int:
        """The block's MLP parameters with ``width`` neurons, biases included."""
        total = width * self.down.module.out_features + _bias_size(self.down.module)
        for m in self.rows:
            per_neuron = m.module.in_features + (1 if m.module.bias is not None else 0)
            total += NEURON_ROWS[m.proj] * width * per_neuron
        return total


def _bias_size(module: nn.Linear) -> int:
    return 0 if module.bias is None else module.bias.numel()


def mlp_blocks(matrices: list[MlpMatrix]) -> list[MlpBlock]:
    """Group the MLP matrices by block; each block must be gate_proj/up_proj/down_proj or gate_up_proj/down_proj,
    dense (a factored, SVD-pruned matrix has no neurons to remove)."""
    by_layer: dict[int, list[MlpMatrix]] = {}
    for m in matrices:
        by_layer.setdefault(m.layer, []).append(m)
    blocks = []
    for layer, group in sorted(by_layer.items()):
        projs = sorted(m.proj for m in group)
        if projs not in (["down_proj", "gate_proj", "up_proj"], ["down_proj", "gate_up_proj"]):
            raise ConfigError(f"prune.method='width': block {layer}'s MLP has projections {projs}; width pruning "
                              "knows gate_proj/up_proj/down_proj and gate_up_proj/down_proj (Phi-3)")
        if any(isinstance(m.module, LowRankLinear) for m in group):
            raise ConfigError("prune.method='width': the model has low-rank (SVD-pruned) layers; width pruning "
                              "removes neurons of dense MLPs — prune width first, then svd")
        blocks.append(MlpBlock(layer, [m for m in group if m.proj != "down_proj"],
                               next(m for m in group if m.proj == "down_proj")))
    return blocks


@torch.no_grad()
def neuron_importance(model: nn.Module, blocks: list[MlpBlock], ids: torch.Tensor,
                      batch_size: int = 4) -> list[torch.Tensor]:
    """Per block, a_j = mean over every token of ``ids`` [N, T] of |h_tj| (h: the input of down_proj): [I] fp64."""
    sums = [torch.zeros(b.width, dtype=torch.float64, device=b.down.module.weight.device) for b in blocks]

    def hook_for(index: int):
        def hook(_module, inputs):
            h = inputs[0]
            sums[index] += h.reshape(-1, h.shape[-1]).abs().sum(0, dtype=torch.float64)
        return hook

    handles = [b.down.module.register_forward_pre_hook(hook_for(i)) for i, b in enumerate(blocks)]
    tokens = forward_batches(model, ids, handles, batch_size)
    return [s.cpu() / tokens for s in sums]


def plan_widths(blocks: list[MlpBlock], cfg: PruneConfig, mlp_dense: int) -> list[int]:
    """Neurons each block keeps for ``cfg.target_reduction`` under the schedule (see the module docstring)."""
    target = cfg.target_reduction

    def reduction(widths: list[int]) -> float:
        return 1 - sum(b.params_at(w) for b, w in zip(blocks, widths)) / mlp_dense

    current = [b.width for b in blocks]
    if reduction(current) >= target - TOLERANCE:
        raise ConfigError(f"prune.target_reduction={target}: the model is already at an MLP reduction of "
                          f"{reduction(current):.4f}; give a larger target than the current one")
    if reduction([1] * len(blocks)) < target - TOLERANCE:
        raise ConfigError(f"prune.target_reduction={target}: unreachable even at 1 neuron per block "
                          f"(max {reduction([1] * len(blocks)):.4f}); allowed: a smaller target")
    if cfg.resolved_schedule == "uniform":  # one w for every block: try them all (I values)
        best = min(range(1, max(current) + 1),
                   key=lambda w: (abs(reduction([min(w, c) for c in current]) - target), -w))
        widths = [min(best, c) for c in current]
    else:
        widths = _solve_tiered(blocks, cfg, reduction)
    if abs(reduction(widths) - target) > TOLERANCE:
        raise ConfigError(f"prune.target_reduction={target}: closest achievable is {reduction(widths):.4f} "
                          "(the MLPs are too narrow for 0.5 pp steps)")
    return widths


def _solve_tiered(blocks: list[MlpBlock], cfg: PruneConfig, reduction) -> list[int]:
    weights = schedule_weights([b.down for b in blocks], cfg)  # down_proj is no gate: edge weight or 1
    scale = 1 / min(weights)  # so that s = 1 leaves every block one neuron
    widest = max(b.width for b in blocks)

    def widths_at(s: float) -> list[int]:
        return [min(b.width, max(1, int((1 - min(1.0, s * scale * w)) * widest))) for b, w in zip(blocks, weights)]

    lo, hi = 0.0, 1.0
    for _ in range(60):  # reduction(widths_at(s)) is non-decreasing in s
        mid = (lo + hi) / 2
        if reduction(widths_at(mid)) < cfg.target_reduction:
            lo = mid
        else:
            hi = mid
    widths, widths_hi = widths_at(lo), widths_at(hi)
    # Between the bracketing levels some blocks lose a neuron; take those steps one block at a time (the most cut
    # blocks first) and keep the combination closest to the target.
    best = list(widths)
    for i in sorted((i for i in range(len(blocks)) if widths[i] != widths_hi[i]), key=lambda i: -weights[i]):
        widths[i] = widths_hi[i]
        if abs(reduction(widths) - cfg.target_reduction) < abs(reduction(best) - cfg.target_reduction):
            best = list(widths)
    return best


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                      dtype=weight.dtype)
    layer.weight.copy_(weight)
    if bias is not None:
        layer.bias.copy_(bias)
    return layer


@torch.no_grad()
def keep_neurons(model: nn.Module, block: MlpBlock, keep: torch.Tensor) -> None:
    """Keep only neurons ``keep`` (ascending indices) of the block's MLP, in place: rows of gate/up (both halves
    of gate_up_proj), columns of down_proj."""
    width = block.width
    for m in block.rows:
        rows = torch.cat([keep + k * width for k in range(NEURON_ROWS[m.proj])]).to(m.module.weight.device)
        bias = None if m.module.bias is None else m.module.bias[rows]
        set_module(model, m.name, _linear(m.module.weight[rows], bias))
    down = block.down.module
    set_module(model, block.down.name, _linear(down.weight[:, keep.to(down.weight.device)], down.bias))
    mlp = model.get_submodule(block.down.name.rpartition(".")[0])
    if isinstance(getattr(mlp, "intermediate_size", None), int):  # Llama/Gemma keep it on the module: keep it true
        mlp.intermediate_size = len(keep)


@torch.no_grad()
def prune_width(job: PruneInput) -> MethodResult:
    """Remove the least important neurons of every MLP of ``job.model`` in place (``job.calibration_ids`` [N, L]);
    one row per matrix (``energy``: the fraction of the block's importance mass kept)."""
    require_matrices(job.matrices)
    model, cfg = job.model, job.cfg
    blocks = mlp_blocks(job.matrices)
    if not isinstance(getattr(model.config, "intermediate_size", None), int):
        raise ConfigError("prune.method='width': the model config has no integer intermediate_size")
    widths = plan_widths(blocks, cfg, job.mlp_params_dense)
    before = [b.width for b in blocks]
    importance = neuron_importance(model, blocks, job.calibration_ids)
    rows = []
    for block, score, width in zip(blocks, importance, widths):
        params_before = {m.name: module_params(m.module) for m in [*block.rows, block.down]}
        # Highest importance first; ties to the lower index, so the choice does not depend on the sort's internals.
        keep = torch.argsort(score, descending=True, stable=True)[:width].sort().values
        kept = float(score[keep].sum() / score.sum().clamp(min=1e-30))
        if width < block.width:
            keep_neurons(model, block, keep)
        for m in [*block.rows, block.down]:
            rows.append(LayerReport(m.name, m.layer, m.proj, m.shape, None, None, params_before[m.name],
                                    module_params(model.get_submodule(m.name)), kept))
            if job.progress is not None:
                job.progress(1)
    # Uniform: the standard architecture's size. Per-block: the widest; save_compressed records the narrower ones.
    model.config.intermediate_size = max(widths)
    uniform = len(set(widths)) == 1

    def sizes(values: list[int]) -> str:
        return str(values[0]) if len(set(values)) == 1 else f"{min(values)}..{max(values)}"

    job.log(f"prune: width ({cfg.resolved_schedule}): intermediate size {sizes(before)} → {sizes(widths)}"
            + (" in every block (a standard architecture)" if uniform else
               " per block (loads through the checkpoint's modeling code: trust_remote_code)"))
    return MethodResult(
        method="width",
        layers=rows,
        settings={"schedule": cfg.resolved_schedule, "target_reduction": cfg.target_reduction,
                  "importance": "mean |act(gate(x))·up(x)| per neuron (the input of down_proj)",
                  "intermediate_size": widths[0] if uniform else None,
                  "widths_before": before, "widths_after": widths},
    )


WIDTH = Method(transform=prune_width, calibration=lambda cfg: "tokens")
