"""The precision policy, in one place: training keeps fp32 master weights whatever dtype a model was loaded in,
runs its forward passes under bf16 autocast on CUDA, and saves fp32; evaluation and caching may run in bf16.

Why fp32 masters: AdamW moves a weight by about the learning rate per step (2e-5..5e-5 here). A bf16 weight of
magnitude |w| has an ulp of |w|·2⁻⁷, so for |w| > ~2.5e-3 an update of 2e-5 is below half an ulp and is rounded
away: measured on SmolLM2-135M with bf16 weights, 4 steps at lr 2e-5 left 23% of the MLP weights exactly unchanged
(the larger ones). Autocast keeps the matmuls in bf16 (the speed) while the weights and optimizer state stay fp32.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

MASTER_DTYPE = torch.float32
TRAIN_LOAD_DTYPE = "fp32"  # what a training stage asks `load_model` for
Autocast = Literal["auto", "bf16", "off"]


def training_load_dtype(requested: str, log=print, what: str = "student") -> str:
    """The dtype a training stage loads its model in: always fp32 (the master weights), whatever was asked."""
    if requested not in ("auto", TRAIN_LOAD_DTYPE):
        log(f"precision: the {what} is loaded in fp32 (master weights for training), not {requested}; "
            "forward passes use bf16 autocast on CUDA")
    return TRAIN_LOAD_DTYPE


def ensure_master_weights(model: torch.nn.Module, log=print) -> torch.nn.Module:
    """Upcast every floating parameter and buffer of ``model`` to fp32 in place (and say so) if any is not."""
    lower = sorted({str(t.dtype).removeprefix("torch.") for t in (*model.parameters(), *model.buffers())
                    if t.is_floating_point() and t.dtype != MASTER_DTYPE})
    if lower:
        log(f"precision: the model was handed over in {', '.join(lower)}; upcast to fp32 master weights "
            "(updates of ~lr would round away in bf16)")
        model.to(MASTER_DTYPE)
    return model


def autocast_dtype(device: torch.device, mode: Autocast) -> torch.dtype | None:
    """bf16 under ``auto`` on CUDA, none on CPU; ``bf16`` forces it (CPU autocast too: how tests exercise the GPU
    path); ``off`` never."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def autocast(device: torch.device, mode: Autocast):
    dtype = autocast_dtype(device, mode)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def describe(device: torch.device, mode: Autocast) -> str:
    dtype = autocast_dtype(device, mode)
    return "fp32 weights" + (" + bf16 autocast" if dtype is not None else "")
