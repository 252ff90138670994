"""Depth pruning: remove the N consecutive decoder blocks whose removal changes the residual stream least.

For every start block l (0 ≤ l ≤ L − N) the *angular distance* between the hidden state entering block l and the
one entering block l + N (for l + N = L: the output of the last block, before the final norm) is

    d(l, N) = mean over calibration tokens t of arccos(cos(x_l[t], x_{l+N}[t])) / π      ∈ [0, 1]

(Gromov et al., 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"). The span with the smallest d is
dropped. The result is a standard, shorter model: the kept blocks renumbered 0 … L−N−1 (so their state-dict keys and
their attention's KV-cache ``layer_idx`` agree), ``num_hidden_layers`` and per-layer config lists (``layer_types``)
cut to match. Stock ``transformers`` loads it; every sparsekd stage does too, and SVD can prune it further.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ConfigError
from .calibration import forward_batches
from .method import Method, MethodResult, PruneInput

PER_LAYER_CONFIG_LISTS = ("layer_types",)  # config lists with one entry per decoder block


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks (``model.model.layers`` for Llama, Qwen, Mistral, Phi-3, ...)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if (name == "layers" or name.endswith(".layers")) and isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ConfigError("prune.method='depth': no decoder block list found (expected `<...>.layers` with "
                      "config.num_hidden_layers blocks)")


def _hidden(value) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


@torch.no_grad()
def angular_distances(model: nn.Module, ids: torch.Tensor, drop: int, batch_size: int = 4,
                      progress=None) -> list[float]:
    """d(l, drop) for l = 0 … L − drop (see the module docstring), averaged over every token of ``ids`` [N, T]."""
    layers = decoder_layers(model)
    n_layers = len(layers)
    if not 1 <= drop < n_layers:
        raise ConfigError(f"prune.drop_blocks={drop}: the model has {n_layers} blocks; allowed: 1 <= drop_blocks "
                          f"<= {n_layers - 1}")
    states: list[torch.Tensor | None] = [None] * (n_layers + 1)  # inputs of blocks 0..L-1, output of block L-1

    def keep_input(index: int):
        def hook(_module, args, kwargs):
            states[index] = _hidden(args[0] if args else kwargs["hidden_states"]).float()
        return hook

    def keep_output(_module, _args, output):
        states[n_layers] = _hidden(output).float()

    handles = [layer.register_forward_pre_hook(keep_input(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(keep_output))
    sums = torch.zeros(n_layers - drop + 1, dtype=torch.float64)

    def accumulate() -> None:  # per token: arccos of the cosine between the states entering l and l + drop
        for l in range(n_layers - drop + 1):
            cos = torch.nn.functional.cosine_similarity(states[l], states[l + drop], dim=-1, eps=1e-12)
            sums[l] += (torch.arccos(cos.clamp(-1.0, 1.0)).double() / math.pi).sum().cpu()

    tokens = forward_batches(model, ids, handles, batch_size, progress, after_batch=accumulate)
    return (sums / tokens).tolist()


def drop_blocks(model: nn.Module, start: int, count: int) -> list[int]:
    """Remove blocks start … start+count−1 in place; renumber the rest and cut the config to match."""
    layers = decoder_layers(model)
    dropped = list(range(start, start + count))
    kept = [layer for i, layer in enumerate(layers) if i not in dropped]
    for new_index, layer in enumerate(kept):
        for module in layer.modules():  # the attention's KV-cache slot (and any other per-layer index)
            if hasattr(module, "layer_idx") and isinstance(module.layer_idx, int):
                module.layer_idx = new_index
    layers_parent_name = next(name for name, m in model.named_modules() if m is layers).rpartition(".")[0]
    parent = model.get_submodule(layers_parent_name) if layers_parent_name else model
    setattr(parent, "layers", nn.ModuleList(kept))
    config = model.config
    config.num_hidden_layers = len(kept)
    for key in PER_LAYER_CONFIG_LISTS:
        values = getattr(config, key, None)
        if isinstance(values, list) and len(values) == len(layers):
            setattr(config, key, [v for i, v in enumerate(values) if i not in dropped])
    if getattr(config, "max_window_layers", None) is not None:  # Qwen2: the first k blocks use full attention
        config.max_window_layers = sum(1 for i in range(min(config.max_window_layers, len(layers))) if i not in dropped)
    return dropped


def prune_depth(job: PruneInput) -> MethodResult:
    """Measure d(l, N) on ``job.calibration_ids``, drop the N blocks with the smallest distance (N =
    ``cfg.drop_blocks``). No per-matrix rows: the settings hold the dropped span and the distance curve."""
    model, drop = job.model, job.cfg.drop_blocks
    n_before = len(decoder_layers(model))
    curve = angular_distances(model, job.calibration_ids, drop, progress=job.progress)
    start = min(range(len(curve)), key=lambda l: (curve[l], l))
    dropped = drop_blocks(model, start, drop)
    job.log(f"prune: depth: dropped blocks {dropped[0]}..{dropped[-1]} of {n_before} "
            f"(angular distance {curve[start]:.4f}; range {min(curve):.4f}..{max(curve):.4f})")
    return MethodResult(
        method="depth",
        layers=[],
        settings={"drop_blocks": drop, "dropped_blocks": dropped, "num_layers_before": n_before,
                  "num_layers_after": n_before - drop,
                  "distance_curve": [{"start": l, "blocks": f"{l}..{l + drop - 1}", "distance": d}
                                     for l, d in enumerate(curve)]},
    )


DEPTH = Method(transform=prune_depth, calibration=lambda cfg: "tokens")  # its calibration pass is the measurement
