"""Teacher cache: a model's top-k (or sampled) next-token distribution over a token corpus, in a Zarr v3 store.

Layout (one group; every array chunked along N by ``chunk_size`` sequences, Blosc-zstd compressed, then a crc32c
checksum of each compressed chunk: see Integrity below):

    input_ids      [N, L]     int32    the corpus
    chunk_done     [C]        uint8    1 once chunk c of every other array is written (our progress record)
  format 2 (the default top-k cache):
    topk_ids       [N, L, k]  uint16   (int32 when the vocabulary exceeds 65,536), by descending probability
    topk_top       [N, L]     float16  log p of the top-1 (full-vocabulary softmax at T = 1)
    topk_codes     [N, L, k]  uint16   each log-prob as whole ``logprob_step``s below the previous one (see
                                       encode_logprobs: decoded error ≤ step/2, not accumulated); stored
                                       rank-major (a Zarr transpose codec) and bit-shuffled
    tail_logmass   [N, L]     float16  log(1 − Σ_topk p_i), to ~1e-3 relative in mass (see teacher_topk)
  format 1 (still read and written with format: 1): topk_ids, topk_logprobs [N, L, k] float16, tail_logmass.
  format 3, a sampled-class cache (``teacher_sample`` N): per position N draws from softmax(z / T) as distinct ids
    sample_ids [N, L, n] (ascending, padded with 0), sample_counts [N, L, n] uint8 (0 = padding), and
    sample_codes [N, L, n] uint16, the tempered log-probabilities log softmax(z / T) of those ids as whole
    ``logprob_step``s below 0 (they enter only the KD value, not its gradient); drawn with
    a generator seeded by (seed, chunk), so a resumed or sharded chunk draws the same classes. kd_loss.py's
    ``tail="sampled"`` turns them into an unbiased estimate of the full-vocabulary KD loss and gradient.

Position l holds the distribution that predicts token l+1 (the last position's predicts past the sequence).
Readers (``TeacherCache``) decode every top-k format to float32 ``topk_logprobs``.
Measured on SmolLM2-135M, k = 32 (benchmarks/cache_formats.py, README): format 1 ~92 bytes/token (uint16 ids ~51,
fp16 log-probs ~38 after byte-shuffle zstd); format 2 at step 0.02 ~75 bytes/token (ids ~51, step codes ~18 stored
rank-major and bit-shuffled, top-1 + tail + corpus ~5), with the KD term and its parameter gradient within 0.1% of an
fp32 teacher (step 0.04: ~3 bytes/token less, but the gradient moves 0.16%). The ids are the floor. Their zero-order
entropy in descending order is ~44 bytes, and neither sorting them (then the log-probs cost more), tie-aware orders,
frequency remaps nor zstd level 19 did better than raw uint16 + zstd (~51). Coders that learn chunk by chunk reach
~48 alone and ~43 mixed with position contexts (benchmarks/cache_entropy.py); the latter decodes position by position.

Precision (``precision.py``): the teacher runs with fp32 weights and fp32 math whatever dtype was asked, so the
cache is the dense model's own distribution; ``teacher_precision`` tf32 (TF32 matmuls on CUDA) or bf16 (bf16
weights) are opt-ins, and then the first ``PROBE_SEQUENCES`` sequences are also run in strict fp32 and the
difference is reported as ``teacher_fidelity`` (``prepare_teacher``). Batching: sequences of one chunk go through
the model ``batch_size`` at a time (``default_batch_size``: 1 on CPU, a GPU-filling divisor of the chunk on CUDA);
every sequence has the same length, so no padding enters and the bytes are those of batch 1 (tested on CPU).

The group attribute ``sparsekd_cache`` is the fingerprint: weights digest, tokenizer digest, data spec + content
digest, k, seq_len, dtype and teacher precision, the chunk checksum, and the digest of the code that writes it
(identity.code_digest: a comment or docstring edit keeps it, a code change does not). Opening an existing store whose
fingerprint differs is an error (``CacheMismatchError``), never a silent reuse. Resume: Zarr does not store all-fill
chunks, so the store listing cannot say what is done; ``chunk_done`` is written after a chunk's data, so a kill -9
loses at most the chunk in flight, and a rerun recomputes exactly the chunks not marked done. Batches never cross a
chunk and the computation is deterministic, so a resumed store holds the same bytes as an uninterrupted one.

Integrity: every array of a store written now ends its codec chain with ``zarr.codecs.Crc32cCodec`` (after the
compression, so it checks the bytes on disk; the fingerprint says ``chunk_checksum: crc32c``). A chunk whose bytes
changed (a flipped bit) fails its read, and every reader here (``TeacherCache``, the resume check of
``write_cache``) turns that, or a chunk that does not decode, into a ``CacheCorruptError`` naming the store and the
chunk file; the flows recompute the cache stage (tasks/store.py digests every chunk file of the stage). Cost: 4
bytes per chunk per array, ~0.003 bytes/token at the defaults (16 sequences x 512 tokens per chunk, 6 arrays) on
~75 bytes/token. Stores written before have no checksum (no ``chunk_checksum`` in the fingerprint): still read, but
a flipped bit there may decode silently into other values; only a chunk that no longer decodes is reported.
A deleted chunk file reads as zeros (Zarr's fill value) for any store: only the flows' file digests catch that.

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

from .config import NAMED_MIXTURES, CacheConfig, ConfigError, MixtureComponent, MixtureConfig
from .identity import code_digest

FORMATS = {1: "top-k, fp16 log-probs", 2: "top-k, log-probs as steps below the top-1", 3: "sampled classes"}
TAIL_EXACT_BELOW = math.log(1e-3)  # tail log-mass below which teacher_topk recomputes it exactly
PROBE_SEQUENCES = 4  # sequences an opt-in teacher precision is measured on against strict fp32
CUDA_TOKENS_PER_FORWARD = 16384  # default_batch_size: enough tokens per forward to fill a GPU's matmuls


class CacheMismatchError(ConfigError):
    """An existing store was written for another model, tokenizer, corpus or k."""


class CacheIncompleteError(ConfigError):
    """The store is missing chunks (its `sparsekd cache` run did not finish)."""


class CacheCorruptError(ConfigError):
    """A chunk of the store fails its crc32c checksum or does not decode; the message names the chunk."""


CHUNK_CHECKSUM = "crc32c"  # the checksum codec every array of a new store ends with (the fingerprint records it)


def read_checked(url: str, array, read, rows: np.ndarray | None = None):
    """``read()`` (a read of Zarr ``array`` of the store at ``url``), with a chunk that fails its checksum or does
    not decode turned into a ``CacheCorruptError`` naming the store and the chunk file. On a failure the chunks
    holding ``rows`` (all chunks when None) are read one by one to find the corrupt one; an error no single chunk
    reproduces (I/O) is raised as it was."""
    try:
        return read()
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - zarr gives ValueError (checksum), numcodecs RuntimeError (decode)
        per_chunk = array.chunks[0]
        n_chunks = -(-array.shape[0] // per_chunk)
        suspects = range(n_chunks) if rows is None else np.unique(np.asarray(rows) // per_chunk).tolist()
        for c in suspects:
            try:
                array[c * per_chunk: (c + 1) * per_chunk]
            except OSError:
                raise err from None
            except Exception as bad:  # noqa: BLE001 - the same failure, now on one chunk
                key = array.metadata.encode_chunk_key((c,) + (0,) * (array.ndim - 1))
                checked = any(codec.to_dict().get("name") == CHUNK_CHECKSUM for codec in array.metadata.codecs)
                why = "fails its crc32c checksum" if checked and "checksum" in str(bad) else \
                    f"does not decode ({type(bad).__name__}: {str(bad).splitlines()[0] if str(bad) else ''})"
                raise CacheCorruptError(
                    f"cache {url!r} is corrupt: chunk file {array.path}/{key} {why}; delete the store and write it "
                    "again with `sparsekd cache` (a flow rerun recomputes its cache stage)") from err
        raise


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


def logprob_encoding(cfg: CacheConfig) -> str:
    if cfg.teacher_sample is not None:
        return f"tempered log-probs of the sampled ids as uint16 steps of {cfg.logprob_step} nats below 0"
    return "float16" if cfg.format == 1 else f"top-1 float16 + uint16 steps of {cfg.logprob_step} nats"


def encode_logprobs(logprobs: torch.Tensor, step: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Format 2: the top-1 log-prob rounded to fp16, and each log-prob as whole steps below the previous one (the
    ids are in descending order, so the codes are small non-negative integers that compress well). The error of a
    decoded log-prob is at most step/2 (plus the top-1's fp16 rounding), not accumulated: codes are differences of
    rounded offsets from the top-1."""
    top = logprobs[..., 0].to(torch.float16)
    offsets = torch.round((top.float()[..., None] - logprobs) / step).clamp_min(0).to(torch.int64)
    codes = torch.diff(offsets, dim=-1, prepend=torch.zeros_like(offsets[..., :1]))
    return top, codes.clamp(0, 65535)


def decode_logprobs(top: np.ndarray, codes: np.ndarray, step: float) -> np.ndarray:
    """Inverse of ``encode_logprobs``: float32 log-probs [..., k]."""
    return top.astype(np.float32)[..., None] - step * np.cumsum(codes.astype(np.int64), axis=-1).astype(np.float32)


@torch.inference_mode()
def teacher_sample(model, input_ids: torch.Tensor, n: int, temperature: float, generator) -> tuple[torch.Tensor, ...]:
    """n class ids per position drawn (with replacement) from the teacher's softened distribution
    softmax(z / temperature), as distinct ids (ascending, padded with id 0 / count 0), their counts and their
    tempered log-probabilities log softmax(z / T): what the unbiased sampled KD estimator needs (kd_loss.py)."""
    return sample_classes(model(input_ids=input_ids, use_cache=False).logits, n, temperature, generator)


def sample_classes(logits: torch.Tensor, n: int, temperature: float, generator) -> tuple[torch.Tensor, ...]:
    """``teacher_sample`` from logits [B, L, V] (fp32 math)."""
    B, L, V = logits.shape
    probs = torch.softmax(logits.float() / temperature, -1).reshape(B * L, V)  # one pass over V, not two
    draws = torch.multinomial(probs, n, replacement=True, generator=generator)  # [B*L, n]
    draws, _ = draws.sort(-1)
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = first.long().cumsum(-1) - 1  # the distinct id's slot, 0..unique-1
    ids = torch.zeros_like(draws).scatter_(1, slot, draws)
    counts = torch.zeros_like(draws).scatter_add_(1, slot, torch.ones_like(draws))
    logprobs = probs.gather(1, ids).log().masked_fill(counts == 0, 0.0)  # drawn classes: far from underflow
    return ids.reshape(B, L, n), counts.reshape(B, L, n), logprobs.reshape(B, L, n)


def default_batch_size(chunk_size: int, seq_len: int, vocab_size: int, device: torch.device) -> int:
    """Sequences per teacher forward when the config does not say: 1 on CPU (a batch-1 forward already runs near
    the CPU's GEMM peak, DESIGN.md); on CUDA the largest divisor of ``chunk_size`` with at most
    ``CUDA_TOKENS_PER_FORWARD`` tokens whose fp32 logits, times 3 (``teacher_topk``'s working copies), fit in half
    the GPU's free memory."""
    if device.type != "cuda":
        return 1
    free = torch.cuda.mem_get_info(device)[0]

    def fits(batch: int) -> bool:
        tokens = batch * seq_len
        return tokens <= max(seq_len, CUDA_TOKENS_PER_FORWARD) and 3 * 4 * tokens * vocab_size <= free // 2

    return max([b for b in range(1, chunk_size + 1) if chunk_size % b == 0 and fits(b)] or [1])


@torch.inference_mode()
def _log_softmax(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, use_cache=False).logits.float().log_softmax(-1)  # [B, L, V]


@torch.inference_mode()
def teacher_fidelity(model, input_ids: torch.Tensor, k: int, precision: str, step: float) -> dict:
    """How far the opt-in ``precision`` (tf32, bf16) moves the teacher from strict fp32 on ``input_ids`` [B, L]:
    ``model`` holds fp32 weights; it is cast to bf16 in place for ``bf16`` (and left so: the caller caches with it).

    Compared at the fp32 teacher's top-k ids (the targets a student would be trained to): the mean and max
    |Δ log p| in nats, the fraction within ``step``/2 (format 2's own error) and within 0.01 nats, and the fraction
    of (position, rank) entries whose id is the same rank by rank."""
    from .precision import teacher_math, teacher_weights_dtype

    device = next(model.parameters()).device
    x = input_ids.to(device)
    with teacher_math(device, "fp32"):
        ref_lp, ref_ids = _log_softmax(model, x).topk(k, dim=-1)
    model.to(teacher_weights_dtype(precision))
    with teacher_math(device, precision):
        low = _log_softmax(model, x)
    ids, at_ref = low.topk(k, dim=-1).indices, low.gather(-1, ref_ids)
    del low
    error = (at_ref - ref_lp).abs()
    return {"precision": precision, "sequences": int(x.shape[0]), "tokens": int(x.numel()),
            "logprob_abs_error_mean": float(error.mean()), "logprob_abs_error_max": float(error.max()),
            "within_half_step_fraction": float((error <= step / 2).float().mean()),
            "within_0.01_nats_fraction": float((error <= 0.01).float().mean()),
            "ids_same_rank_fraction": float((ids == ref_ids).float().mean()),
            "reference": "strict fp32 (weights and math) on the same sequences"}


def prepare_teacher(loaded, cfg: CacheConfig, input_ids: torch.Tensor, log=print) -> dict | None:
    """Put the loaded teacher in the precision ``cfg.teacher_precision`` says (precision.py) and, for an opt-in,
    return its measured fidelity to strict fp32 (else None). A teacher handed over in another dtype is upcast to
    fp32 first (its weights then carry that dtype's rounding; the loaders never do this: ``models.load_teacher``)."""
    from .precision import ensure_master_weights

    ensure_master_weights(loaded.model, log=log, why="the teacher computes in fp32; load it with models.load_teacher")
    loaded.dtype = torch.float32
    if cfg.teacher_precision == "fp32":
        return None
    k = min(cfg.top_k, int(loaded.model.config.vocab_size))
    fidelity = teacher_fidelity(loaded.model, input_ids[:PROBE_SEQUENCES], k, cfg.teacher_precision,
                                cfg.logprob_step)
    loaded.dtype = next(loaded.model.parameters()).dtype
    log(f"cache: teacher precision {cfg.teacher_precision} (opt-in) vs fp32 on {fidelity['tokens']} tokens: "
        f"|Δ log p| mean {fidelity['logprob_abs_error_mean']:.4f}, max {fidelity['logprob_abs_error_max']:.3f} nats; "
        f"{fidelity['within_half_step_fraction']:.2%} within half a format-2 step; "
        f"{fidelity['ids_same_rank_fraction']:.2%} of top-{k} ids at the same rank")
    return fidelity


def _open_group(url: str, mode: str):
    import zarr
    from zarr.errors import ContainsGroupError

    try:
        return zarr.open_group(store=url, mode=mode, zarr_format=3)
    except ContainsGroupError:  # mode "a": another shard created the group between zarr's check and its write
        return zarr.open_group(store=url, mode=mode, zarr_format=3)


def _differences(have: dict, want: dict) -> list[str]:
    return [f"{key}: store has {have.get(key)!r}, this run has {want.get(key)!r}"
            for key in sorted(set(have) | set(want)) if have.get(key) != want.get(key)]


@dataclass
class CacheResult:
    path: str
    sequences: int
    tokens: int
    top_k: int | None  # None for a sampled-class cache
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
    format: int = 2  # 1, 2: top-k (fp16 / stepped log-probs); 3: sampled classes
    teacher_sample: int | None = None  # classes sampled per position (format 3)
    teacher_precision: str = "fp32"  # precision.py: fp32, or the opt-in tf32 / bf16
    teacher_fidelity: dict | None = None  # an opt-in's measured error against strict fp32 (teacher_fidelity)
    batch_size: int = 1  # sequences per teacher forward

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def shard_chunks(n_chunks: int, index: int, shards: int) -> range:
    """The chunks shard ``index`` of ``shards`` writes: a contiguous range, the ranges disjoint and covering all."""
    return range(index * n_chunks // shards, (index + 1) * n_chunks // shards)


def _open_store(url: str, specs: dict, fingerprint: dict):
    """Open the store at ``url`` for writing, creating its arrays if it has none; safe with concurrent writers
    (shards starting at once): an array is never overwritten once it exists, so no shard can erase another's
    chunks. A store with another fingerprint, or arrays of another layout, is an error."""
    from zarr.codecs import Crc32cCodec, ZstdCodec
    from zarr.errors import ContainsArrayError

    group = _open_group(url, "a")

    def check(have: dict) -> None:
        if "teacher_precision" in fingerprint and "teacher_precision" not in have:  # written before the policy:
            # an fp32 teacher if its weights were fp32
            have = dict(have, teacher_precision="fp32" if have.get("dtype", "float32") == "float32" else None)
        diff = _differences(have, fingerprint)
        if diff:
            raise CacheMismatchError(f"cache.out={url!r} holds a cache for something else ({'; '.join(diff)}); "
                                     "give another --out or delete that store")

    existing = group.attrs.asdict().get("sparsekd_cache")
    if existing is not None:
        check(existing)
        return group
    members = set(group.array_keys())
    for name, (shape, dtype, codec, rows, *filters) in specs.items():
        if name not in members:
            try:
                # The checksum last, over the compressed bytes: what is on disk is what it checks.
                compressors = [codec if codec is not None else ZstdCodec(level=0), Crc32cCodec()]
                group.create_array(name, shape=shape, dtype=dtype, chunks=(rows,) + shape[1:], fill_value=0,
                                   filters=filters[0] if filters else "auto", compressors=compressors,
                                   overwrite=False)
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
    from zarr.codecs import BloscCodec, TransposeCodec

    from .precision import teacher_math

    n, seq_len = input_ids.shape
    k, chunk = cfg.top_k, cfg.chunk_size
    sampled = cfg.teacher_sample is not None
    if not sampled and k > vocab_size:
        raise ConfigError(f"cache.top_k={k} is larger than the vocabulary ({vocab_size})")
    fingerprint = dict(fingerprint, format=3 if sampled else cfg.format, top_k=None if sampled else k,
                       seq_len=int(seq_len), sequences=int(n), chunk_size=chunk, code_version=code_digest("cache"),
                       logprob_encoding=logprob_encoding(cfg), logprob_step=cfg.logprob_step,
                       chunk_checksum=CHUNK_CHECKSUM)
    if sampled:
        fingerprint.update(kind="sampled", teacher_sample=cfg.teacher_sample,
                           sample_temperature=cfg.sample_temperature, sample_seed=cfg.seed)
    id_dtype = np.uint16 if vocab_size <= 65536 else np.int32
    n_chunks = -(-n // chunk)

    shuffle = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
    plain = BloscCodec(cname="zstd", clevel=5, shuffle="noshuffle")
    # The step codes, rank-major (each rank's codes together: one distribution per rank) and bit-shuffled (they
    # are small integers): 17.9 instead of 19.7 bytes/token on SmolLM2 at k = 32 (benchmarks/cache_entropy.py).
    # Only the stored bytes change; Zarr undoes the transpose on read, so older stores read the same.
    bits, rank_major = BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle"), [TransposeCodec(order=(0, 2, 1))]
    m = cfg.teacher_sample or k
    body = {  # name -> (trailing shape, dtype, codec[, filters])
        1: {"topk_ids": ((k,), id_dtype, plain), "topk_logprobs": ((k,), np.float16, shuffle),
            "tail_logmass": ((), np.float16, shuffle)},
        2: {"topk_ids": ((k,), id_dtype, plain), "topk_top": ((), np.float16, shuffle),
            "topk_codes": ((k,), np.uint16, bits, rank_major), "tail_logmass": ((), np.float16, shuffle)},
        3: {"sample_ids": ((m,), id_dtype, shuffle), "sample_counts": ((m,), np.uint8, shuffle),
            "sample_codes": ((m,), np.uint16, shuffle)},
    }[fingerprint["format"]]
    specs = {"input_ids": ((n, seq_len), np.int32, shuffle, chunk),
             **{name: ((n, seq_len) + tail, dtype, codec, chunk, *filters)
                for name, (tail, dtype, codec, *filters) in body.items()},
             "chunk_done": ((n_chunks,), np.uint8, None, 1)}

    def compute(x: torch.Tensor, generator) -> dict[str, torch.Tensor]:
        if sampled:
            ids, counts, logprobs = teacher_sample(model, x, cfg.teacher_sample, cfg.sample_temperature, generator)
            # The log-probs only enter the KD *value* (the gradient needs ids and counts): steps below 0 suffice.
            codes = torch.round(-logprobs / cfg.logprob_step).clamp(0, 65535)
            return {"sample_ids": ids, "sample_counts": counts, "sample_codes": codes}
        ids, logprobs, tail = teacher_topk(model, x, k)
        tail = tail.clamp_min(-60000.0)
        if cfg.format == 1:
            return {"topk_ids": ids, "topk_logprobs": logprobs, "tail_logmass": tail}
        top, codes = encode_logprobs(logprobs, cfg.logprob_step)
        return {"topk_ids": ids, "topk_top": top, "topk_codes": codes, "tail_logmass": tail}

    group = _open_store(cfg.out, specs, fingerprint)
    mine = shard_chunks(n_chunks, cfg.shard_index, cfg.num_shards)
    done = read_checked(cfg.out, group["chunk_done"], lambda: group["chunk_done"][:])
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
    batch = cfg.batch_size or default_batch_size(chunk, int(seq_len), vocab_size, device)
    if chunk % batch:
        raise ConfigError(f"cache.batch_size={batch} does not divide chunk_size={chunk}")
    computed_tokens = 0
    t0 = time.perf_counter()
    for c in todo:
        lo, hi = c * chunk, min(n, (c + 1) * chunk)
        # Sampling is seeded per chunk, so a resumed or sharded chunk draws exactly what one process would.
        generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + c) if sampled else None
        parts = []
        for b in range(lo, hi, batch):
            x = input_ids[b : min(hi, b + batch)].to(device)
            with teacher_math(device, cfg.teacher_precision):
                computed = compute(x, generator)
            parts.append({name: t.cpu() for name, t in computed.items()})
            computed_tokens += x.numel()
            if progress is not None:
                progress(x.shape[0])
        group["input_ids"][lo:hi] = input_ids[lo:hi].numpy().astype(np.int32)
        for name in body:
            group[name][lo:hi] = torch.cat([part[name] for part in parts]).numpy().astype(specs[name][1])
        group["chunk_done"][c] = 1  # only now is chunk c trusted by a rerun
        if cfg.num_shards > 1:  # overall progress: every shard's chunks, as the store says
            log(f"{who}: chunk {c} done; store {int(group['chunk_done'][:].sum())}/{n_chunks} chunks")
        if on_chunk is not None:
            on_chunk(c)
    seconds = time.perf_counter() - t0
    size = store_bytes(cfg.out)
    tokens = int(n * seq_len)
    chunks_done = int(group["chunk_done"][:].sum())
    return CacheResult(path=cfg.out, sequences=int(n), tokens=tokens, top_k=None if sampled else k, bytes=size,
                       bytes_per_token=size / tokens, tokens_per_s=computed_tokens / seconds if seconds > 0 else 0.0,
                       resumed_chunks=resumed, computed_chunks=len(todo), seconds=seconds,
                       shard=f"{cfg.shard_index}/{cfg.num_shards}", chunks=n_chunks, chunks_done=chunks_done,
                       complete=chunks_done == n_chunks, format=fingerprint["format"],
                       teacher_sample=cfg.teacher_sample, teacher_precision=cfg.teacher_precision, batch_size=batch)


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
        "dtype": str(loaded.dtype).removeprefix("torch."),  # the teacher's weights as they ran
        "teacher_precision": cfg.teacher_precision,
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
        done = read_checked(url, group["chunk_done"], lambda: group["chunk_done"][:])
        if not done.all():
            raise CacheIncompleteError(
                f"cache {url!r} is incomplete ({int(done.sum())} of {done.size} chunks); rerun the same "
                "`sparsekd cache` command to finish it"
            )
        self.url, self.group, self.fingerprint = url, group, info
        self.num_sequences, self.seq_len = group["input_ids"].shape
        self.format = int(info.get("format", 1))
        self.kind = info.get("kind", "topk")  # "topk" (formats 1, 2) or "sampled" (format 3)
        self.top_k = int(info["top_k"]) if self.kind == "topk" else None
        self.teacher_sample = info.get("teacher_sample")
        self.sample_temperature = info.get("sample_temperature")
        self.step = float(info["logprob_step"]) if self.format >= 2 else None
        self.chunk_checksum = info.get("chunk_checksum")  # None: written before chunks carried a checksum
        # Opened once: ``group[name]`` reads the array's metadata again at every call (~1.25 ms each).
        self.arrays = {name: group[name] for name in group.array_keys()}

    def __len__(self) -> int:
        return self.num_sequences

    def _read(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (any order, repeats allowed) of array ``name``. Zarr's orthogonal selection groups the rows
        by chunk: each chunk a batch touches is decoded once per array, however many of its rows lie there
        (measured: tests/test_prefetch.py). A training batch's rows mostly lie in different chunks, so a batch of B
        decodes ~B whole chunks per array; the training loop reads it while the step before computes."""
        array = self.arrays[name]
        return read_checked(self.url, array, lambda: array.get_orthogonal_selection((rows,)), rows)

    def __getitem__(self, indices) -> dict[str, torch.Tensor]:
        """Sequences ``indices``: input_ids and, for a top-k cache, topk_ids / topk_logprobs (float, decoded) /
        tail_logmass; for a sampled cache, sample_ids / sample_counts / sample_logprobs."""
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        names = {"topk": ("input_ids", "topk_ids", "tail_logmass"),
                 "sampled": ("input_ids", "sample_ids", "sample_counts")}[self.kind]
        out = {}
        for name in names:
            arr = self._read(name, rows)
            out[name] = torch.from_numpy(arr.astype(np.int64) if arr.dtype.kind in "iu" else arr)
        if self.kind == "topk":
            logprobs = self._read("topk_logprobs", rows) if self.format == 1 else \
                decode_logprobs(self._read("topk_top", rows), self._read("topk_codes", rows), self.step)
            out["topk_logprobs"] = torch.from_numpy(logprobs)
        else:
            out["sample_logprobs"] = torch.from_numpy(-self.step * self._read("sample_codes", rows).astype(np.float32))
        return out


def run_cache(loaded, cfg: CacheConfig, log=print, progress_factory=None) -> CacheResult:
    """Build the corpus, fingerprint it with the model, and write/finish the store (the `sparsekd cache` verb)."""
    corpus = build_corpus(cfg, loaded.tokenizer, log=log)
    input_ids = corpus.input_ids
    max_pos = getattr(loaded.model.config, "max_position_embeddings", None)
    if max_pos is not None and cfg.seq_len > max_pos:
        raise ConfigError(f"cache.seq_len={cfg.seq_len} exceeds the model's max_position_embeddings ({max_pos})")
    # Precision first: the fingerprint digests the weights as the teacher runs them (bf16 under that opt-in).
    fidelity = prepare_teacher(loaded, cfg, input_ids, log=log)
    fingerprint = cache_fingerprint(loaded, cfg, input_ids)
    what = f"{cfg.teacher_sample} sampled classes at T={cfg.sample_temperature}" if cfg.teacher_sample \
        else f"top-{cfg.top_k}, format {cfg.format}"
    log(f"cache: {input_ids.shape[0]} sequences from {corpus.documents} documents x {input_ids.shape[1]} tokens, "
        f"{what} -> {cfg.out}")
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
    result.teacher_fidelity = fidelity
    return result
