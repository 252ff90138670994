"""Does a distill step wait for its batch? The teacher-cache read of one micro-batch against the training step, and
the loop's wait for data per step with and without the read-ahead (``distill.BatchReader``); figures, not tests.

    flock /tmp/sparsekd-heavy.lock python benchmarks/distill_prefetch.py [--model smollm2-135m --sequences 64 \
        --seq-len 256 --top-k 32 --batch-size 4 --steps 8 --repeats 2 --workdir /tmp/distill-prefetch]

``--model tiny``: a randomly initialised 2-layer Llama with SmolLM2's vocabulary (49,152), when the model is not at
hand or to see a step nearer a GPU's (the cache then holds a random model's top-k over random tokens). The cache is
format 2 with the default chunk of 16 sequences, written once into ``--workdir`` and reused. Figures are medians:
the read over ``--steps`` seeded training batches (the rows of a batch lie in different chunks, as in training), the
step and its wait over the steps of each run but the first (whose batch no read-ahead could have prepared). The
runs with and without the read-ahead alternate, ``--repeats`` of each; each trains ``--steps`` steps of the real
``distill`` loop (validation only at its start and end, no checkpoints inside).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sparsekd_core.distill as distill_module  # noqa: E402
from sparsekd_core.cache import TeacherCache, run_cache, tokenizer_digest, write_cache  # noqa: E402
from sparsekd_core.config import CacheConfig, DistillConfig, ModelConfig  # noqa: E402
from sparsekd_core.distill import batch_indices, distill  # noqa: E402


def load(name: str):
    """(model in fp32, tokenizer, spec) of SmolLM2 or of the tiny random model."""
    if name != "tiny":
        from sparsekd_core.models import load_model

        loaded = load_model(ModelConfig(model=name, dtype="fp32"), log=lambda m: None)
        return loaded, loaded.model, loaded.tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=49152, hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True), dtype=torch.float32)
    return None, model, make_tokenizer()


def build_cache(args, loaded, model, tokenizer, out: Path) -> str:
    cfg = CacheConfig(out=str(out), data="wikitext2:train", num_samples=args.sequences, seq_len=args.seq_len,
                      top_k=args.top_k, batch_size=4, max_sequences_per_document=8)
    if loaded is not None:
        run_cache(loaded, cfg, log=lambda m: None)
        return cfg.out
    from sparsekd_core.models import weights_digest

    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.sequences, args.seq_len), generator=torch.Generator().manual_seed(0))
    fp = {"model": "tiny", "weights_digest": weights_digest(model), "tokenizer_digest": tokenizer_digest(tokenizer),
          "vocab_size": vocab, "data": "random", "data_digest": "random", "num_samples": args.sequences, "seed": 0,
          "dtype": "float32"}
    write_cache(model, ids, cfg, fp, vocab, log=lambda m: None)
    return cfg.out


def read_seconds(cache: TeacherCache, batches: list[list[int]]) -> float:
    times = []
    for rows in batches:
        t0 = time.perf_counter()
        cache[rows]
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_run(args, model, tokenizer, cache: str, out: Path, ahead: bool) -> dict:
    """One distill run of args.steps steps; per step (after the first): seconds and seconds waited for data."""
    import copy

    distill_module.PREFETCH = ahead
    marks = []
    cfg = DistillConfig(cache=cache, out=str(out), max_steps=args.steps, epochs=100, batch_size=args.batch_size,
                        lr=1e-5, eval_every=0, val_data="wikitext2:valid", val_tokens=256, val_ctx=128,
                        checkpoint_minutes=0, seed=1)
    distill(cfg, copy.deepcopy(model), tokenizer, "bench", log=lambda m: None,
            progress=lambda step, total, postfix: marks.append((time.perf_counter(), postfix["wait_s"])))
    steps = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    return {"step": steps, "wait": [w for _, w in marks[1:]]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/distill-prefetch")
    args = parser.parse_args()

    work = Path(args.workdir) / f"{args.model}-{args.sequences}x{args.seq_len}-k{args.top_k}"
    loaded, model, tokenizer = load(args.model)
    cache_path = build_cache(args, loaded, model, tokenizer, work / "cache.zarr")
    cache = TeacherCache(cache_path)
    n, chunk = len(cache), int(cache.fingerprint["chunk_size"])
    batches = [batch_indices(m, n, args.batch_size, 1) for m in range(args.steps)]
    chunks_touched = statistics.median(len({r // chunk for r in rows}) for rows in batches)
    read_random = read_seconds(cache, batches)
    read_one_chunk = read_seconds(cache, [list(range(c * chunk, c * chunk + args.batch_size))
                                          for c in range(min(args.steps, n // chunk))])

    runs = {True: {"step": [], "wait": []}, False: {"step": [], "wait": []}}
    for repeat in range(args.repeats):
        for ahead in (True, False):
            out = work / f"run-{'ahead' if ahead else 'inline'}-{repeat}"
            shutil.rmtree(out, ignore_errors=True)
            for key, values in train_run(args, model, tokenizer, cache_path, out, ahead).items():
                runs[ahead][key] += values
            shutil.rmtree(out, ignore_errors=True)

    def ms(x: float) -> str:
        return f"{1000 * x:8.1f}"

    print(f"model {args.model}, cache {n} x {args.seq_len} tokens, top-{args.top_k}, format {cache.format}, chunks "
          f"of {chunk} sequences; batch {args.batch_size}; {args.steps} steps x {args.repeats} runs each; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"cache[batch] read + decode (median of {len(batches)}): {ms(read_random).strip()} ms for a training batch "
          f"({chunks_touched:.0f} chunks touched), {ms(read_one_chunk).strip()} ms for {args.batch_size} rows of one "
          "chunk")
    print("| loop | step ms (median) | data wait ms/step (median) | wait / step |")
    print("|---|---:|---:|---:|")
    for ahead, label in ((False, "read in the loop"), (True, "read ahead")):
        step, wait = statistics.median(runs[ahead]["step"]), statistics.median(runs[ahead]["wait"])
        print(f"| {label} | {ms(step)} | {ms(wait)} | {wait / step:6.1%} |")
    print(f"read / step (no read-ahead): {read_random / statistics.median(runs[False]['step']):.1%}")


if __name__ == "__main__":
    main()
