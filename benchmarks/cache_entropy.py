"""How far below its stored size could a format-2 top-k cache go? Entropy bounds from a written store.

    python benchmarks/cache_entropy.py runs/study-smollm2/cache/<key>/teacher.zarr

Prints the stored bytes/token of each array and, for the ids and the log-prob codes, what an ideal entropy coder
would need under simple models: zero-order with an oracle table (the store's own histogram, free), conditioned on
the rank, with a table learned from the first chunk(s) only (what a coder that writes chunks independently could
share), and with the previous position's top-k set as context. These are lower bounds for such coders, not
figures of an implemented format.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import zarr


def entropy_bytes(x: np.ndarray) -> float:
    _, counts = np.unique(x, return_counts=True)
    p = counts / counts.sum()
    return float(-(counts * np.log2(p)).sum() / 8)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("store")
    ap.add_argument("--chunk", type=int, default=16, help="sequences per chunk (the store's chunk_size)")
    args = ap.parse_args()
    g = zarr.open_group(args.store, mode="r")
    ids = g["topk_ids"][:].astype(np.int64)
    codes = g["topk_codes"][:].astype(np.int64)
    n, length, k = ids.shape
    tokens = n * length
    print(f"{args.store}: {n} sequences × {length} tokens, k={k}")
    total = 0.0
    for name in sorted(g.array_keys()):
        path = os.path.join(args.store, name)
        size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
        total += size
        print(f"  stored {name:14s} {size / tokens:6.2f} B/token")
    print(f"  stored total          {total / tokens:6.2f} B/token")
    print(f"ids: zero-order, oracle table       {entropy_bytes(ids) / tokens:6.2f} B/token")
    print(f"ids: conditioned on rank, oracle    {sum(entropy_bytes(ids[..., r]) for r in range(k)) / tokens:6.2f}")
    vocab = int(ids.max()) + 1
    for chunks in (1, 2):
        ref, rest = ids[: args.chunk * chunks], ids[args.chunk * chunks:]
        if rest.size == 0:
            break
        counts = np.bincount(ref.ravel(), minlength=vocab).astype(float) + 0.5  # add-½ for unseen ids
        bits = -np.log2(counts / counts.sum())
        print(f"ids: table from the first {chunks} chunk(s)   {bits[rest].sum() / 8 / rest[..., 0].size:6.2f}")
    values, counts = np.unique(ids, return_counts=True)
    lut = np.zeros(vocab)
    lut[values] = -np.log2(counts / counts.sum())
    cost = lut[ids]
    prev = np.concatenate([np.full((n, 1, k), -1), ids[:, :-1]], axis=1)
    in_prev = (ids[..., :, None] == prev[..., None, :]).any(-1)
    f = in_prev.mean()
    flag = -(f * np.log2(f) + (1 - f) * np.log2(1 - f)) * in_prev.size
    bits = flag + in_prev.sum() * np.log2(k) + cost[~in_prev].sum()
    print(f"ids: previous position's set as context (flag + index, else oracle zero-order) "
          f"{bits / 8 / tokens:6.2f}  ({100 * f:.1f}% of ids were in it)")
    print(f"codes: zero-order, oracle           {entropy_bytes(codes) / tokens:6.2f}")
    print(f"codes: conditioned on rank, oracle  {sum(entropy_bytes(codes[..., r]) for r in range(k)) / tokens:6.2f}")


if __name__ == "__main__":
    main()
