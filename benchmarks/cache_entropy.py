"""How far below its stored size could a format-2 top-k cache go? Entropy bounds from a written store.

    python benchmarks/cache_entropy.py runs/study-smollm2/cache/<key>/teacher.zarr

Prints the stored bytes/token of each array and, for the ids and the log-prob codes, what an ideal entropy coder
would need under simple models: zero-order with an oracle table (the store's own histogram, free), conditioned on
the rank, with a table learned from the first chunk(s) only (what a coder that writes chunks independently could
share), and with the previous position's top-k set as context; then coders that learn chunk by chunk with
nothing stored (``adaptive_bits``), alone and mixed with three position contexts. These are ideal code lengths for
such coders, not figures of an implemented format.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import zarr

from sparsekd_core.cache import store_bytes


def entropy_bytes(x: np.ndarray) -> float:
    _, counts = np.unique(x, return_counts=True)
    p = counts / counts.sum()
    return float(-(counts * np.log2(p)).sum() / 8)


RANK_GROUPS = ([0], [1], [2, 3], list(range(4, 8)), list(range(8, 16)), list(range(16, 32)))


def adaptive_bits(ids: np.ndarray, inputs: np.ndarray, chunk: int, w_bigram: float, w_prev: float,
                  w_next: float) -> float:
    """Ideal code length (bits) of the ids under models that learn as they go, chunk by chunk (a reader decodes a
    chunk alone, so nothing is shared between chunks and no table is stored). Per sequence, a unigram per rank
    group: its counts so far in the chunk, + 0.1 × every rank's, + 0.5 × the chunk's input-token counts (stored
    first), + 0.01. With weights > 0 it is mixed, per id, with three contexts: the ids seen so far after the same
    input token (w_bigram), the previous position's top-k set (w_prev), and the next input token (w_next). An
    arithmetic coder gets within ~0.1% of this; it decodes position by position."""
    from collections import Counter, defaultdict

    n, length, k = ids.shape
    vocab = int(max(ids.max(), inputs.max())) + 1
    groups = [g for g in RANK_GROUPS if g[0] < k]
    groups[-1] = list(range(groups[-1][0], k))
    group_of = np.zeros(k, dtype=np.int64)
    for gi, g in enumerate(groups):
        group_of[g] = gi
    bits = 0.0
    for c0 in range(0, n, chunk):
        x, xi = ids[c0:c0 + chunk], inputs[c0:c0 + chunk]
        prior = 0.5 * np.bincount(xi.ravel(), minlength=vocab) + 0.01
        per_group, every = np.zeros((len(groups), vocab)), np.zeros(vocab)
        after: dict[int, Counter] = defaultdict(Counter)
        for s in range(x.shape[0]):
            weights = per_group + 0.1 * every + prior
            table = weights / weights.sum(-1, keepdims=True)
            p = table[group_of, x[s]]  # [L, k]
            if w_bigram or w_prev or w_next:
                for t in range(length):
                    row, seen = x[s, t], after[xi[s, t]]
                    total = sum(seen.values())
                    wb, wp = (w_bigram if total else 0.0), (w_prev if t else 0.0)
                    wn = w_next if t + 1 < length else 0.0
                    mix = (1 - wb - wp - wn) * p[t]
                    if total:
                        mix += wb * np.array([seen[i] for i in row]) / total
                    if t:
                        mix += wp * np.isin(row, x[s, t - 1]) / k
                    if t + 1 < length:
                        mix += wn * (row == xi[s, t + 1])
                    p[t] = mix
                    seen.update(row.tolist())
            bits += -np.log2(p).sum()
            for gi, g in enumerate(groups):
                per_group[gi] += np.bincount(x[s][:, g].ravel(), minlength=vocab)
            every += np.bincount(x[s].ravel(), minlength=vocab)
    return float(bits)


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
        size = store_bytes(os.path.join(args.store, name))
        total += size
        print(f"  stored {name:14s} {size / tokens:6.2f} B/token")
    print(f"  stored total          {total / tokens:6.2f} B/token")
    values, counts = np.unique(ids, return_counts=True)
    lut = np.zeros(int(ids.max()) + 1)  # each id's zero-order code length, bits
    lut[values] = -np.log2(counts / counts.sum())
    print(f"ids: zero-order, oracle table       {(counts * lut[values]).sum() / 8 / tokens:6.2f} B/token")
    print(f"ids: conditioned on rank, oracle    {sum(entropy_bytes(ids[..., r]) for r in range(k)) / tokens:6.2f}")
    vocab = int(ids.max()) + 1
    for chunks in (1, 2):
        ref, rest = ids[: args.chunk * chunks], ids[args.chunk * chunks:]
        if rest.size == 0:
            break
        counts = np.bincount(ref.ravel(), minlength=vocab).astype(float) + 0.5  # add-½ for unseen ids
        bits = -np.log2(counts / counts.sum())
        print(f"ids: table from the first {chunks} chunk(s)   {bits[rest].sum() / 8 / rest[..., 0].size:6.2f}")
    cost = lut[ids]
    prev = np.concatenate([np.full((n, 1, k), -1), ids[:, :-1]], axis=1)
    in_prev = (ids[..., :, None] == prev[..., None, :]).any(-1)
    f = in_prev.mean()
    flag = -(f * np.log2(f) + (1 - f) * np.log2(1 - f)) * in_prev.size
    bits = flag + in_prev.sum() * np.log2(k) + cost[~in_prev].sum()
    print(f"ids: previous position's set as context (flag + index, else oracle zero-order) "
          f"{bits / 8 / tokens:6.2f}  ({100 * f:.1f}% of ids were in it)")
    inputs = g["input_ids"][:].astype(np.int64)
    for name, weights in (("adaptive per chunk, rank groups", (0.0, 0.0, 0.0)),
                          ("adaptive + context mixing", (0.4, 0.15, 0.02))):
        print(f"ids: {name:31s} {adaptive_bits(ids, inputs, args.chunk, *weights) / 8 / tokens:6.2f}")
    print(f"codes: zero-order, oracle           {entropy_bytes(codes) / tokens:6.2f}")
    print(f"codes: conditioned on rank, oracle  {sum(entropy_bytes(codes[..., r]) for r in range(k)) / tokens:6.2f}")
    pairs = np.minimum(codes[..., :-1], 255) * 65536 + codes[..., 1:]  # (previous code, capped; code), per rank
    joint = sum(entropy_bytes(pairs[..., r]) - entropy_bytes(np.minimum(codes[..., r], 255)) for r in range(k - 1))
    print(f"codes: + the previous rank's code  {(entropy_bytes(codes[..., 0]) + joint) / tokens:6.2f}  (oracle "
          "tables of up to 256 × 65,536 entries per rank: optimistic)")


if __name__ == "__main__":
    main()
