"""Cache cost vs a bare forward pass, and bytes/token, on the same sequences.

    flock /tmp/sparsekd-heavy.lock python benchmarks/cache_throughput.py [--model smollm2-135m --num-samples 16 --seq-len 256]

Bare forward = the model's forward (logits included) over the same sequences in the same batches, nothing else.
Cache = sparsekd_core.cache.write_cache (forward + top-k + tail + fp16/uint16 conversion + compressed Zarr writes).
On a shared machine other jobs distort single runs; compare the best of each (printed last).
The two are run alternately (bare, cache, bare, cache) and the best of each is compared.
"""

import argparse
import sys
from pathlib import Path

from sparsekd_core.config import ModelConfig
from sparsekd_core.models import load_for

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ratios import cache_ratio  # noqa: E402  (one implementation of the measurement, shared with ratios.py)

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--num-samples", type=int, default=16)
parser.add_argument("--seq-len", type=int, default=256)
parser.add_argument("--top-k", type=int, default=32)
parser.add_argument("--repeats", type=int, default=2)
args = parser.parse_args()

loaded = load_for("teacher", ModelConfig(model=args.model))  # fp32 teacher (precision.py)
r = cache_ratio(loaded, args.num_samples, args.repeats, seq_len=args.seq_len, top_k=args.top_k)
print(f"tokens {r['tokens']}, top-k {args.top_k}: bytes/token {r['bytes_per_token']:.1f}")
print(f"bare forward {r['bare_tokens_per_s']:.1f} tok/s, cache {r['cache_tokens_per_s']:.1f} tok/s, "
      f"ratio {r['ratio']:.3f}")
