"""Which teacher cache recovers a model best at the same budget: format 1, format 2 and the sampled-class cache.

    python benchmarks/teacher_compare.py [--workdir runs/teacher-compare --steps 24 --samples 64 --seq-len 256]

One run, through the `sparsekd` verbs (each resumes or reuses its output, so a rerun finishes what is missing):
three caches of SmolLM2-135M over the same 64×256 tokens of mix:paper-offline (k=32 top-k in formats 1 and 2;
12 sampled classes at T=2); the dense model pruned 15% (whitened tiered SVD); Dense+KD and Pruned+KD trained from
each cache for the same steps, seed and lr (tail topk for the top-k caches, tail sampled for the sampled one);
then every model evaluated in domain (WikiText-2 test, paper protocol) and out of the KD corpus (held-out C4).
Prints a Markdown table (cache size and write throughput, perplexities), which docs/results/teacher-formats.md keeps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--workdir", default="runs/teacher-compare")
parser.add_argument("--samples", type=int, default=64)
parser.add_argument("--seq-len", type=int, default=256)
parser.add_argument("--steps", type=int, default=24)
parser.add_argument("--lr", type=float, default=5e-5)
parser.add_argument("--eval-tokens", type=int, default=4096)
args = parser.parse_args()
work = Path(args.workdir)
work.mkdir(parents=True, exist_ok=True)


def verb(*argv: str) -> dict:
    """Run one `sparsekd` verb with --json; its JSON (the last stdout line)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sparsekd", *argv, "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"sparsekd {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {argv[0]} {argv[-1] if argv[0] != 'eval' else argv[2]}: {time.perf_counter() - t0:.0f} s", flush=True)
    return result


caches = {"format 1": ["--format", "1"], "format 2": ["--format", "2"], "sampled 12": ["--teacher-sample", "12"]}
cache_rows = {}
for name, flags in caches.items():
    out = work / (name.replace(" ", "-") + ".zarr")
    res = verb("cache", "--model", args.model, "--data", "mix:paper-offline", "--num-samples", str(args.samples),
               "--seq-len", str(args.seq_len), "--top-k", "32", *flags, "--out", str(out))
    cache_rows[name] = (res, out)
pruned = work / "pruned15"
verb("prune", "--model", args.model, "--target-reduction", "0.15", "--out", str(pruned))

evals = {}


def evaluate(label: str, model: str) -> None:
    evals[label] = {name: verb("eval", "--model", model, "--data", data, "--max-tokens", str(args.eval_tokens))["ppl"]
                    for name, data in (("wikitext2", "wikitext2:test"), ("c4_heldout", "c4:heldout"))}


evaluate("dense", args.model)
evaluate("pruned 15% (pre-KD)", str(pruned))
for name, (_, cache) in cache_rows.items():
    for student_label, student in (("Dense+KD", args.model), ("Pruned+KD", str(pruned))):
        out = work / f"{student_label}-{name}".replace(" ", "-").replace("+", "")
        verb("distill", "--student", student, "--cache", str(cache), "--out", str(out), "--max-steps",
             str(args.steps), "--batch-size", "2", "--lr", str(args.lr), "--eval-every", "0", "--val-tokens", "1024",
             "--alpha", "0.5", "--temperature", "2.0", "--tail", "sampled" if "sampled" in name else "topk")
        evaluate(f"{student_label} ({name})", str(out))

print(f"\n{args.model}: {args.samples}x{args.seq_len} tokens of mix:paper-offline; {args.steps} steps x 2 sequences, "
      f"lr {args.lr}, alpha 0.5, T 2; eval: first {args.eval_tokens} tokens, paper protocol\n")
print("| cache | bytes/token | write tokens/s |\n|---|---|---|")
for name, (res, _) in cache_rows.items():  # a store finished earlier computes nothing now: no throughput to show
    speed = f"{res['tokens_per_s']:.0f}" if res["computed_chunks"] else "(reused; benchmarks/cache_formats.py)"
    print(f"| {name} | {res['bytes_per_token']:.1f} | {speed} |")
print("\n| model | WikiText-2 test PPL | held-out C4 PPL |\n|---|---|---|")
for label, ppl in evals.items():
    print(f"| {label} | {ppl['wikitext2']:.2f} | {ppl['c4_heldout']:.2f} |")
