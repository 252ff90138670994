"""Calibration statistics of the MLP projections' inputs, shared by activation-aware SVD and WANDA."""

from __future__ import annotations

import torch

from ..config import ConfigError
from ..data import load_documents, pack_sequences
from .lowrank import MlpMatrix


def calibration_ids(tokenizer, source: str, samples: int, seq_len: int) -> torch.Tensor:
    """``samples`` sequences of ``seq_len`` tokens [N, L] int64, documents of ``source`` packed in order."""
    docs = [d for d in load_documents(source) if isinstance(d, str) and d.strip()]
    rows = pack_sequences(docs, tokenizer, seq_len, samples)
    if len(rows) < samples:
        raise ConfigError(
            f"prune.calibration={source!r}: only {len(rows)} sequence(s) of {seq_len} tokens available, "
            f"{samples} asked; lower calibration_samples/calibration_seq_len or give a larger source"
        )
    return torch.tensor(rows, dtype=torch.int64)


@torch.no_grad()
def input_statistics(model, matrices: list[MlpMatrix], ids: torch.Tensor, diagonal_only: bool = False,
                     batch_size: int = 4, progress=None) -> tuple[dict[str, torch.Tensor], int]:
    """Second moment of each matrix's input over the calibration tokens.

    Returns ({name: Σ_t x_t x_tᵀ [in, in] fp32} — or only its diagonal Σ_t x_t² [in] with ``diagonal_only`` — ,
    number of tokens). Accumulated per batch in fp32 on the model's device.
    """
    stats: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(_module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            moment = (x * x).sum(0) if diagonal_only else x.T @ x
            if name in stats:
                stats[name] += moment
            else:
                stats[name] = moment
        return hook

    handles = [m.module.register_forward_pre_hook(hook_for(m.name)) for m in matrices]
    tokens = forward_batches(model, ids, handles, batch_size, progress)
    return stats, tokens


@torch.no_grad()
def forward_batches(model, ids: torch.Tensor, handles: list, batch_size: int = 4, progress=None,
                    after_batch=None) -> int:
    """Run ``ids`` [N, T] through ``model`` in batches for the hooks in ``handles`` (removed at the end, also on
    error); ``after_batch()`` runs after each forward. Returns the number of tokens forwarded."""
    device = next(model.parameters()).device
    tokens = 0
    try:
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start : start + batch_size].to(device)
            model(input_ids=batch, use_cache=False)
            if after_batch is not None:
                after_batch()
            tokens += batch.numel()
            if progress is not None:
                progress(batch.shape[0])
    finally:
        for h in handles:
            h.remove()
    return tokens
