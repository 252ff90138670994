"""Cache cost vs a bare forward pass, and bytes/token, on the same sequences.

    flock /tmp/sparsekd-heavy.lock python benchmarks/cache_throughput.py [--model smollm2-135m --num-samples 16 --seq-len 256]

Bare forward = the model's forward (logits included) over the same sequences in the same batches, nothing else.
Cache = sparsekd_core.cache.write_cache (forward + top-k + tail + fp16/uint16 conversion + compressed Zarr writes).
On a shared machine other jobs distort single runs; compare the best of each (printed last).
The two are run alternately (bare, cache, bare, cache) and the best of each is compared.
"""

import argparse
import shutil
import tempfile
import time

import torch

from sparsekd_core.cache import build_corpus, cache_fingerprint, write_cache
from sparsekd_core.config import CacheConfig, ModelConfig
from sparsekd_core.models import load_model

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--num-samples", type=int, default=16)
parser.add_argument("--seq-len", type=int, default=256)
parser.add_argument("--top-k", type=int, default=32)
parser.add_argument("--repeats", type=int, default=2)
args = parser.parse_args()

loaded = load_model(ModelConfig(model=args.model))
tmp = tempfile.mkdtemp()
cfg = CacheConfig(out=f"{tmp}/c.zarr", data="mix:paper-offline", num_samples=args.num_samples, seq_len=args.seq_len,
                  top_k=args.top_k)
ids = build_corpus(cfg, loaded.tokenizer, log=lambda m: None).input_ids
fp = cache_fingerprint(loaded, cfg, ids)


@torch.inference_mode()
def bare() -> float:
    t0 = time.perf_counter()
    for i in range(ids.shape[0]):
        loaded.model(input_ids=ids[i : i + 1], use_cache=False).logits
    return ids.numel() / (time.perf_counter() - t0)


bare_tps, cache_tps = [], []
for r in range(args.repeats):
    bare_tps.append(bare())
    shutil.rmtree(f"{tmp}/c.zarr", ignore_errors=True)
    res = write_cache(loaded.model, ids, cfg, fp, loaded.model.config.vocab_size, log=lambda m: None)
    cache_tps.append(res.tokens_per_s)
    print(f"run {r}: bare forward {bare_tps[-1]:.1f} tok/s, cache {cache_tps[-1]:.1f} tok/s")
print(f"tokens {ids.numel()}, top-k {args.top_k}: bytes/token {res.bytes_per_token:.1f} ({res.bytes} bytes)")
print(f"bare forward {max(bare_tps):.1f} tok/s, cache {max(cache_tps):.1f} tok/s, ratio {max(cache_tps) / max(bare_tps):.3f}")
shutil.rmtree(tmp, ignore_errors=True)
