"""What a stage's output depends on, resolved to content (sparsekd_core/identity.py composes these into the one
stage key; the CLI records the same facts in its JSON).

* the resolved runtime: dtype and device as they will be used (``auto`` is resolved first, so ``auto`` and
  ``fp32`` on a CPU are the same stage), for training the precision policy (fp32 masters, autocast), and on a GPU
  its name (two GPU models round differently; two GPUs of one model compute the same numbers);
* models by content (``models.model_fingerprint``: GGUF/directory digests, hub commits), never by path;
* data by content (``data.source_digest``): the documents a named source, a hub stream or a file gives;
* the library versions that compute the numbers (``environment``); the code is identity.code_digest's.
"""

from __future__ import annotations

import importlib.metadata

# torch/transformers compute the numbers, tokenizers the token ids, gguf dequantises GGUF models, zarr stores caches.
LIBRARIES = ("torch", "transformers", "tokenizers", "gguf", "zarr")


def environment() -> dict[str, str]:
    """Versions of the libraries whose code computes the numbers (a new torch can change a logit's last bit)."""
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def resolved_runtime(dtype: str, device: str, stage: str = "eval") -> dict[str, str]:
    """{"dtype": "float32", "device": "cpu"}: the dtype ``stage`` really loads its model in (the precision policy,
    precision.stage_load_dtype: fp32 for prune and teacher whatever was asked) with ``auto`` resolved, and the
    device kind and GPU name (cuda:0 and cuda:1 of one model compute the same numbers)."""
    from .models import resolve_device, resolve_dtype
    from .precision import stage_load_dtype

    dev = resolve_device(device)
    loaded = stage_load_dtype(stage, dtype, log=lambda message: None)
    return {"dtype": str(resolve_dtype(loaded, dev)).removeprefix("torch."), **_device(dev)}


def _device(dev) -> dict[str, str]:
    """{"device": kind}, and on CUDA {"gpu": its name}: results are reused across GPUs of one model only."""
    if dev.type != "cuda":
        return {"device": dev.type}
    import torch

    return {"device": dev.type, "gpu": torch.cuda.get_device_name(dev)}


def training_runtime(device: str, autocast: str) -> dict[str, str | None]:
    """The precision a training stage really uses (precision.py): fp32 weights, and the autocast dtype if any."""
    from .models import resolve_device
    from .precision import MASTER_DTYPE, autocast_dtype

    dev = resolve_device(device)
    cast = autocast_dtype(dev, autocast)
    return {"weights": str(MASTER_DTYPE).removeprefix("torch."), **_device(dev),
            "autocast": None if cast is None else str(cast).removeprefix("torch.")}


def data_digests(specs, limit: int | None = None) -> dict[str, str]:
    """{spec: content digest of its documents} for data specs (named, hub or local)."""
    from .data import source_digest

    return {spec: source_digest(spec, limit) for spec in specs}


def machine(device: str) -> dict[str, str | int]:
    """The hardware a timing was taken on (for stages whose output is a measurement: profiling): the GPU's name,
    or the CPU model and thread count."""
    import os
    import platform

    import torch

    from .models import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda":
        return {"gpu": torch.cuda.get_device_name(dev), "count": torch.cuda.device_count()}
    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "threads": torch.get_num_threads(), "cores": os.cpu_count() or 0}
