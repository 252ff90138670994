"""Cache throughput with 1 process vs N concurrent shards of one store (`sparsekd cache --shard I/N`), same corpus.

    python benchmarks/cache_shards.py [--model smollm2-135m --num-samples 32 --seq-len 256 --shards 2 --threads 2]

Every configuration runs the real CLI in fresh processes (model load included in `wall`). The machine's cores are
split evenly: one process gets --threads torch threads, each of N shards gets threads/N (so the comparison is of
the same hardware, not of oversubscription). Prints, per configuration, the wall time from start to a complete
store, the tokens computed per wall second, and each process's own `tokens_per_s` (forward + top-k + write time),
then the ratio. The stores are compared array for array (they must be equal). On a 2-core CPU, sharding can only
trade one process's intra-op parallelism for two processes' data parallelism; on N GPUs each shard has its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--data", default="mix:paper-offline")
parser.add_argument("--num-samples", type=int, default=32)
parser.add_argument("--seq-len", type=int, default=256)
parser.add_argument("--chunk-size", type=int, default=4)
parser.add_argument("--shards", type=int, default=2)
parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
args = parser.parse_args()


def run(out: Path, shards: int) -> tuple[float, list[dict]]:
    threads = max(1, args.threads // shards)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    base = [sys.executable, "-m", "sparsekd", "cache", "--model", args.model, "--data", args.data, "--num-samples",
            str(args.num_samples), "--seq-len", str(args.seq_len), "--chunk-size", str(args.chunk_size),
            "--out", str(out), "--json"]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(base + (["--shard", f"{i}/{shards}"] if shards > 1 else []), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for i in range(shards)]
    results = []
    for proc in procs:
        stdout, _ = proc.communicate()
        if proc.returncode != 0:
            sys.exit(f"cache process failed with exit code {proc.returncode}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return time.perf_counter() - t0, results


def same(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != "zarr.json")
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != "zarr.json") and \
        all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


tmp = Path(tempfile.mkdtemp())
tokens = args.num_samples * args.seq_len
print(f"{args.model}, {args.num_samples}x{args.seq_len} tokens of {args.data}, {os.cpu_count()} cores, "
      f"{args.threads} torch threads in all")
rows = {}
for shards in (1, args.shards):
    wall, results = run(tmp / f"s{shards}.zarr", shards)
    per = ", ".join(f"{r['shard']}: {r['tokens_per_s']:.0f}" for r in results)
    rows[shards] = tokens / wall
    print(f"{shards} process(es) x {max(1, args.threads // shards)} threads: wall {wall:.1f} s "
          f"(model loads included), {tokens / wall:.0f} tokens/wall-s; each process's tokens/s: {per}")
print(f"stores equal array for array: {same(tmp / 's1.zarr', tmp / f's{args.shards}.zarr')}")
print(f"ratio {args.shards} shards / 1 process (tokens per wall second): {rows[args.shards] / rows[1]:.2f}x")
