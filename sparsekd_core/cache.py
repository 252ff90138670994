"""Teacher cache: a model's top-k next-token distribution over a token corpus, in a Zarr v3 store.

Layout (one group; every array chunked along N by ``chunk_size`` sequences, Blosc-zstd compressed):

    input_ids      [N, L]     int32    the corpus
    topk_ids       [N, L, k]  uint16   (int32 when the vocabulary exceeds 65,536), by descending probability
    topk_logprobs  [N, L, k]  float16  log p_i of the full-vocabulary softmax at T = 1
    tail_logmass   [N, L]     float16  log(1 − Σ_topk p_i), to ~1e-3 relative in mass (see teacher_topk)
    chunk_done     [C]        uint8    1 once chunk c of every array above is written (our progress record)

Position l holds the distribution that predicts token l+1 (the last position's predicts past the sequence).
On SmolLM2-135M at k=32 this is ~92 bytes/token on disk (uint16 ids ~51, fp16 log-probs ~38 after byte-shuffle
zstd); fp16 log-probs keep the KD term within ~0.01% of an fp32 cache (benchmarks/cache_kd_agreement.py), so no
lossier encoding is used.

The group attribute ``sparsekd_cache`` is the fingerprint: weights digest, tokenizer digest, data spec + content
digest, k, seq_len, dtype, code version. Opening an existing store whose fingerprint differs is an error
(``CacheMismatchError``), never a silent reuse. Resume: Zarr does not store all-fill chunks, so the store listing
cannot say what is done; ``chunk_done`` is written after a chunk's data, so a kill -9 loses at most the chunk in
flight, and a rerun recomputes exactly the chunks not marked done. Batches never cross a chunk and the computation
is deterministic, so a resumed store holds the same bytes as an uninterrupted one.

Shards (``num_shards`` > 1, ``sparsekd cache --shard I/N``): N processes, on one host or several sharing the store,
each build the same corpus and write a disjoint contiguous range of chunks (``shard_chunks``); the arrays are
created by whichever comes first and never overwritten, so any mix of shards finished, killed and rerun (or one
process finishing what the shards left) gives the bytes of a one-process cache. A reader needs every chunk done.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .config import NAMED_MIXTURES, CacheConfig, ConfigError, MixtureComponent, MixtureConfig

FORMAT = 1
ARRAYS = ("input_ids", "topk_ids", "topk_logprobs", "tail_logmass")
TAIL_EXACT_BELOW = math.log(1e-3)  # tail log-mass below which teacher_topk recomputes it exactly


class CacheMismatchError(ConfigError):
    """An existing store was written for another model, tokenizer, corpus or k."""


class CacheIncompleteError(ConfigError):
    """The store is missing chunks (its `sparsekd cache` run did not finish)."""


def tokenizer_digest(tokenizer) -> str:
    """Digest of the vocabulary (token → id) and the special tokens: equal digests = interchangeable ids."""
    h = hashlib.blake2b(digest_size=8)
    for token, index in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        h.update(f"{index}\t{token}\n".encode("utf-8", "surrogatepass"))
    h.update(repr(sorted((str(k), str(v)) for k, v in tokenizer.special_tokens_map.items())).encode())
    return h.hexdigest()


def corpus_digest(input_ids: torch.Tensor) -> str:
    return hashlib.blake2b(input_ids.to(torch.int64).contiguous().numpy().tobytes(), digest_size=8).hexdigest()


def corpus_mixture(cfg: CacheConfig) -> tuple[MixtureConfig, bool]:
    """The mixture a cache config means, and whether it takes every sample (one source, no num_samples)."""
    if cfg.data in NAMED_MIXTURES:
        components = [MixtureComponent(source=s, weight=w) for s, w in NAMED_MIXTURES[cfg.data].items()]
    else:
        components = [MixtureComponent(source=cfg.data, weight=1.0)]
    mix = MixtureConfig(components=components, num_samples=cfg.num_samples or 1, seq_len=cfg.seq_len, seed=cfg.seed,
                        max_sequences_per_document=cfg.max_sequences_per_document)
    return mix, cfg.num_samples is None


def corpus_reads(cfg: CacheConfig) -> dict[str, int | None]:
    """{source: the document limit the corpus build reads it with (streamed hub sources; None = whole)}."""
    from .data import corpus_limit, split_counts

    mix, every = corpus_mixture(cfg)
    counts = [None] if every else split_counts(mix.num_samples, [c.weight for c in mix.components])
    return {c.source: corpus_limit(n) for c, n in zip(mix.components, counts)}


def corpus_digests(cfg: CacheConfig) -> dict[str, str]:
    """{source: content digest of the documents the corpus build reads from it} (what a cache stage key holds)."""
    from .data import source_digest

    return {source: source_digest(source, limit) for source, limit in corpus_reads(cfg).items()}


def build_corpus(cfg: CacheConfig, tokenizer, log=print):
    """The KD corpus (``data.Corpus``; token ids [N, L] int64): a named mixture, or one source/file cut the same way
    (validated documents, seeded order, a sample per document). With no num_samples a single source gives every
    sample its documents give."""
    from .data import build_mixture

    mix, every = corpus_mixture(cfg)
    return build_mixture(mix, tokenizer, log=log, all_sequences=every)


@torch.inference_mode()
def teacher_topk(model, input_ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k ids, their log-probs and the tail log-mass for every position of a batch [B, L] (fp32 math).

    The tail is log(1 − Σ_topk p) in float64, accurate to ~1e-6 in mass (the rounding of the fp32 logsumexp);
    where the tail mass is below 1e-3 that is not precise enough, so those positions (~10% on SmolLM2) get the
    exact logsumexp over the ids outside the top-k. Only one full logsumexp and one top-k pass over V otherwise:
    the bare forward pass is nearly all the cost.
    """
    logits = model(input_ids=input_ids, use_cache=False).logits.float()  # [B, L, V]
    lse = logits.logsumexp(-1)
    values, ids = logits.topk(k, dim=-1)
    logprobs = values - lse[..., None]
    tail = torch.log1p(-logprobs.double().exp().sum(-1).clamp(max=1.0)).float()
    small = tail < TAIL_EXACT_BELOW
    if small.any():
        rows = logits[small].scatter_(-1, ids[small], float("-inf"))  # [R, V], a copy of the selected rows only
        tail[small] = rows.logsumexp(-1) - lse[small]
    return ids, logprobs, tail


def _open_group(url: str, mode: str):
    import zarr

    return zarr.open_group(store=url, mode=mode, zarr_format=3)


def _differences(have: dict, want: dict) -> list[str]:
    return [f"{key}: store has {have.get(key)!r}, this run has {want.get(key)!r}"
            for key in sorted(set(have) | set(want)) if have.get(key) != want.get(key)]


@dataclass
class CacheResult:
    path: str
    sequences: int
    tokens: int
    top_k: int
    bytes: int
    bytes_per_token: float
    tokens_per_s: float
    resumed_chunks: int
    computed_chunks: int
    seconds: float
    documents: int | None = None  # distinct source documents in the corpus (set by run_cache)
    shard: str = "0/1"  # shard_index/num_shards this process wrote
    chunks: int = 0  # chunks in the store
    chunks_done: int = 0  # chunks done in the store (all shards) when this process finished
    complete: bool = True  # every chunk of the store is done (bytes/token is of the finished store only then)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def shard_chunks(n_chunks: int, index: int, shards: int) -> range:
    """The chunks shard ``index`` of ``shards`` writes: a contiguous range, the ranges disjoint and covering all."""
    return range(index * n_chunks // shards, (index + 1) * n_chunks // shards)


def _open_store(url: str, specs: dict, fingerprint: dict):
    """Open the store at ``url`` for writing, creating its arrays if it has none; safe with concurrent writers
    (shards starting at once): an array is never overwritten once it exists, so no shard can erase another's
    chunks. A store with another fingerprint, or arrays of another layout, is an error."""
    from zarr.errors import ContainsArrayError

    group = _open_group(url, "a")

    def check(have: dict) -> None:
        diff = _differences(have, fingerprint)
        if diff:
            raise CacheMismatchError(f"cache.out={url!r} holds a cache for something else ({'; '.join(diff)}); "
                                     "give another --out or delete that store")

    existing = group.attrs.asdict().get("sparsekd_cache")
    if existing is not None:
        check(existing)
        return group
    members = set(group.array_keys())
    for name, (shape, dtype, codec, rows) in specs.items():
        if name not in members:
            try:
                group.create_array(name, shape=shape, dtype=dtype, chunks=(rows,) + shape[1:], fill_value=0,
                                   compressors=codec if codec is not None else "auto", overwrite=False)
                continue
            except ContainsArrayError:  # another shard made it between the listing and here
                pass
        array = group[name]
        if tuple(array.shape) != shape or array.dtype != np.dtype(dtype) or array.chunks[0] != rows:
            raise CacheMismatchError(
                f"cache.out={url!r} has an array {name!r} of shape {tuple(array.shape)}, not {shape}, and no "
                "fingerprint (a write of another cache that was killed at its start?); delete that store")
    group.attrs["sparsekd_cache"] = fingerprint  # written after the arrays: a store with attrs has all of them
    check(_open_group(url, "r").attrs.asdict()["sparsekd_cache"])  # a concurrent writer of another cache
    return group


def store_bytes(url: str) -> int:
    """Size of the store on disk (sum of its files), local path or fsspec URL."""
    if "://" not in url or url.startswith("file://"):
        root = Path(url.removeprefix("file://"))
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    import fsspec

    fs, path = fsspec.url_to_fs(url)
    fs.invalidate_cache()  # a listing cached before this process (or another) wrote chunks would be stale
    return int(fs.du(path))


def write_cache(model, input_ids: torch.Tensor, cfg: CacheConfig, fingerprint: dict, vocab_size: int,
                log=print, progress=None, on_chunk=None) -> CacheResult:
    """Write (or finish) the cache of `model` over `input_ids` [N, L] at cfg.out.

    ``fingerprint`` must describe model, tokenizer and data; an existing store with a different one raises
    CacheMismatchError. ``progress(n_sequences)`` and ``on_chunk(chunk_index)`` (after a chunk is marked done)
    are optional hooks.
    """
    from zarr.codecs import BloscCodec

    n, seq_len = input_ids.shape
    k, chunk = cfg.top_k, cfg.chunk_size
    if k > vocab_size:
        raise ConfigError(f"cache.top_k={k} is larger than the vocabulary ({vocab_size})")
    fingerprint = dict(fingerprint, format=FORMAT, top_k=k, seq_len=int(seq_len), sequences=int(n),
                       chunk_size=chunk, code_version=__version__, logprob_encoding="float16")
    id_dtype = np.uint16 if vocab_size <= 65536 else np.int32
    n_chunks = -(-n // chunk)

    shuffle = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
    plain = BloscCodec(cname="zstd", clevel=5, shuffle="noshuffle")
    specs = {
        "input_ids": ((n, seq_len), np.int32, shuffle, chunk),
        "topk_ids": ((n, seq_len, k), id_dtype, plain, chunk),
        "topk_logprobs": ((n, seq_len, k), np.float16, shuffle, chunk),
        "tail_logmass": ((n, seq_len), np.float16, shuffle, chunk),
        "chunk_done": ((n_chunks,), np.uint8, None, 1),
    }
    group = _open_store(cfg.out, specs, fingerprint)
    mine = shard_chunks(n_chunks, cfg.shard_index, cfg.num_shards)
    done = group["chunk_done"][:]
    todo = [c for c in mine if not done[c]]
    resumed = len(mine) - len(todo)
    who = f"cache shard {cfg.shard_index + 1}/{cfg.num_shards}" if cfg.num_shards > 1 else "cache"
    if cfg.num_shards > 1:
        span = f"chunks {mine.start}-{mine.stop - 1}" if len(mine) else "no chunks (more shards than chunks)"
        log(f"{who}: {span} of {n_chunks}")
    if resumed:
        log(f"{who}: resuming, {resumed} of {len(mine)} chunks already done")
        if progress is not None:
            progress(sum(min(n, (c + 1) * chunk) - c * chunk for c in mine if done[c]))
    device = next(model.parameters()).device
    computed_tokens = 0
    t0 = time.perf_counter()
    for c in todo:
        lo, hi = c * chunk, min(n, (c + 1) * chunk)
        parts = []
        for b in range(lo, hi, cfg.batch_size):
            x = input_ids[b : min(hi, b + cfg.batch_size)].to(device)
            parts.append([t.cpu() for t in teacher_topk(model, x, k)])
            computed_tokens += x.numel()
            if progress is not None:
                progress(x.shape[0])
        ids, logprobs, tail = (torch.cat(p) for p in zip(*parts))
        group["input_ids"][lo:hi] = input_ids[lo:hi].numpy().astype(np.int32)
        group["topk_ids"][lo:hi] = ids.numpy().astype(id_dtype)
        group["topk_logprobs"][lo:hi] = logprobs.numpy().astype(np.float16)
        group["tail_logmass"][lo:hi] = tail.clamp_min(-60000.0).numpy().astype(np.float16)
        group["chunk_done"][c] = 1  # only now is chunk c trusted by a rerun
        if cfg.num_shards > 1:  # overall progress: every shard's chunks, as the store says
            log(f"{who}: chunk {c} done; store {int(group['chunk_done'][:].sum())}/{n_chunks} chunks")
        if on_chunk is not None:
            on_chunk(c)
    seconds = time.perf_counter() - t0
    size = store_bytes(cfg.out)
    tokens = int(n * seq_len)
    chunks_done = int(group["chunk_done"][:].sum())
    return CacheResult(path=cfg.out, sequences=int(n), tokens=tokens, top_k=k, bytes=size,
                       bytes_per_token=size / tokens, tokens_per_s=computed_tokens / seconds if seconds > 0 else 0.0,
                       resumed_chunks=resumed, computed_chunks=len(todo), seconds=seconds,
                       shard=f"{cfg.shard_index}/{cfg.num_shards}", chunks=n_chunks, chunks_done=chunks_done,
                       complete=chunks_done == n_chunks)


def cache_fingerprint(loaded, cfg: CacheConfig, input_ids: torch.Tensor) -> dict:
    from .models import weights_digest

    return {
        "model": loaded.spec,
        "weights_digest": weights_digest(loaded.model),
        "tokenizer_digest": tokenizer_digest(loaded.tokenizer),
        "vocab_size": int(loaded.model.config.vocab_size),
        "data": cfg.data,
        "data_digest": corpus_digest(input_ids),
        "num_samples": cfg.num_samples,
        "seed": cfg.seed,
        "dtype": str(loaded.dtype).removeprefix("torch."),
    }


class TeacherCache:
    """A finished cache opened for reading: ``cache[indices]`` → dict of torch tensors for those sequences."""

    def __init__(self, url: str):
        if "://" not in url and not Path(url).expanduser().exists():
            raise ConfigError(f"cache {url!r} does not exist; write it with `sparsekd cache --out {url} ...`")
        group = _open_group(url, "r")
        info = group.attrs.asdict().get("sparsekd_cache")
        if info is None:
            raise ConfigError(f"cache {url!r} is not a sparsekd cache (no 'sparsekd_cache' attributes)")
        done = group["chunk_done"][:]
        if not done.all():
            raise CacheIncompleteError(
                f"cache {url!r} is incomplete ({int(done.sum())} of {done.size} chunks); rerun the same "
                "`sparsekd cache` command to finish it"
            )
        self.url, self.group, self.fingerprint = url, group, info
        self.num_sequences, self.seq_len = group["input_ids"].shape
        self.top_k = int(info["top_k"])

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, indices) -> dict[str, torch.Tensor]:
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = {}
        for name in ARRAYS:
            arr = self.group[name].get_orthogonal_selection((rows,))
            out[name] = torch.from_numpy(arr.astype(np.int64) if arr.dtype in (np.uint16, np.int32) else arr)
        return out


def run_cache(loaded, cfg: CacheConfig, log=print, progress_factory=None) -> CacheResult:
    """Build the corpus, fingerprint it with the model, and write/finish the store (the `sparsekd cache` verb)."""
    corpus = build_corpus(cfg, loaded.tokenizer, log=log)
    input_ids = corpus.input_ids
    max_pos = getattr(loaded.model.config, "max_position_embeddings", None)
    if max_pos is not None and cfg.seq_len > max_pos:
        raise ConfigError(f"cache.seq_len={cfg.seq_len} exceeds the model's max_position_embeddings ({max_pos})")
    fingerprint = cache_fingerprint(loaded, cfg, input_ids)
    log(f"cache: {input_ids.shape[0]} sequences from {corpus.documents} documents x {input_ids.shape[1]} tokens, "
        f"top-{cfg.top_k} -> {cfg.out}")
    n_chunks = -(-input_ids.shape[0] // cfg.chunk_size)
    mine = shard_chunks(n_chunks, cfg.shard_index, cfg.num_shards)
    share = max(0, min(input_ids.shape[0], mine.stop * cfg.chunk_size) - mine.start * cfg.chunk_size)
    bar = progress_factory(share) if progress_factory else None
    try:
        result = write_cache(loaded.model, input_ids, cfg, fingerprint, int(loaded.model.config.vocab_size),
                             log=log, progress=bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()
    result.documents = corpus.documents
    return result
