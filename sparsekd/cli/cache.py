"""`sparsekd cache`: the model's top-k (or sampled) next-token distribution over a corpus, in a Zarr v3 store."""

from __future__ import annotations

import argparse

from sparsekd_core.config import CacheConfig

from ._common import MODEL, add_output_flags, config_help, configs, dtype_name, emit, log, progress
from ._flags import Flag, Section, add_section_flags

# shard_index/num_shards come from --shard I/N (one flag, checked as a pair).
CACHE = Section("cache", CacheConfig, tuple(f for f in CacheConfig.model_fields if f not in ("shard_index",
                                                                                             "num_shards")))


def _shard(text: str) -> tuple[int, int]:
    """``I/N`` (0-based I) -> (I, N), for --shard."""
    try:
        index, shards = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N (e.g. 0/2: the first of two shards)") from None
    if not 0 <= index < shards:
        raise argparse.ArgumentTypeError(f"{text!r}: I must be 0..N-1 (e.g. 0/2 and 1/2 for two shards)")
    return index, shards


def add_cache_parser(sub) -> None:
    p = sub.add_parser("cache", help="cache the model's top-k next-token distribution over a corpus (Zarr v3)")
    add_section_flags(p, (MODEL, CACHE), overrides={"teacher_sample": Flag(metavar="N")})
    p.add_argument("--shard", type=_shard, metavar="I/N",
                   help="write shard I (0-based) of N: a disjoint chunk range of the same --out, for N processes "
                        "or hosts at once; the store is complete when every shard has finished")
    add_output_flags(p, config_help((MODEL, CACHE)))
    p.set_defaults(func=cmd_cache)


def cmd_cache(args: argparse.Namespace) -> int:
    from sparsekd_core.cache import run_cache
    from sparsekd_core.models import load_for

    if args.shard is not None:
        args.shard_index, args.num_shards = args.shard
    model_cfg, cache_cfg = configs(args, CACHE, ("out",))
    loaded = load_for("teacher", model_cfg, log=log)  # fp32 whatever --dtype says (precision.py)
    desc = "cache" if cache_cfg.num_shards == 1 else f"cache {cache_cfg.shard_index}/{cache_cfg.num_shards}"
    res = run_cache(loaded, cache_cfg, log=log, progress_factory=progress(desc, "seq"))
    result = res.as_dict() | {"model": model_cfg.model, "data": cache_cfg.data, "device": loaded.device.type,
                              "dtype": dtype_name(loaded)}
    size = (f"{res.bytes_per_token:.1f} bytes/token" if res.complete
            else f"store {res.chunks_done}/{res.chunks} chunks done (other shards pending)")
    emit(result, args.json, f"cache {res.path}: {res.sequences} sequences from {res.documents} documents, "
         f"{res.tokens} tokens, " + (f"top-{res.top_k}" if res.top_k else f"{res.teacher_sample} sampled classes")
         + f", {size}, {res.tokens_per_s:.0f} tokens/s, {res.resumed_chunks} chunks resumed")
    return 0
