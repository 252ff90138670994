"""generate() speed of a factored (SVD-pruned) SmolLM2-135M loaded with trust_remote_code vs the dense model.

Both load through stock transformers: the dense model from sparsekd's converted fp32 directory, the factored one
with ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` (its own modeling_sparsekd.py). Greedy,
``--new-tokens`` tokens exactly (min = max), prompts of ``--prompt-len`` WikiText-2 test tokens, fp32 on CPU. Runs
alternate dense / factored so that other jobs on the machine slow both alike; each figure is the best of
``--repeats``. The pruned directory is made once (``--target-reduction`` of the MLP parameters, the `sparsekd prune`
defaults) and reused.

    flock /tmp/sparsekd-heavy.lock python benchmarks/generate_factored.py [--out DIR --target-reduction 0.35
        --batch-sizes 1,16 --new-tokens 32 --prompt-len 32 --repeats 3 --threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparsekd_core.config import ModelConfig, PruneConfig
from sparsekd_core.data import load_text
from sparsekd_core.models import cache_root, load_model, resolve_source
from sparsekd_core.prune import prune_model, save_compressed


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_pruned(out: Path, target: float) -> None:
    loaded = load_model(ModelConfig(model="smollm2-135m", dtype="fp32", device="cpu"), log=log)
    prune_model(loaded.model, loaded.tokenizer, PruneConfig(target_reduction=target), parent="smollm2-135m", log=log)
    save_compressed(loaded.model, loaded.tokenizer, out)


def seconds_to_generate(model, prompts: torch.Tensor, new_tokens: int) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    assert out.shape[1] == prompts.shape[1] + new_tokens
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(cache_root() / "bench" / "smollm2-135m-svd35"))
    ap.add_argument("--target-reduction", type=float, default=0.35)
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    out = Path(args.out).expanduser()
    if not (out / "modeling_sparsekd.py").is_file():
        log(f"pruning smollm2-135m to {out} (once) ...")
        make_pruned(out, args.target_reduction)
    dense_dir, _ = resolve_source(ModelConfig(model="smollm2-135m"), log=log)
    models = {
        "dense": AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval(),
        "factored": AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval(),
    }
    tokenizer = AutoTokenizer.from_pretrained(out)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    text_ids = tokenizer(load_text("wikitext2:test")[:200_000], return_tensors="pt")["input_ids"][0]
    prompts = text_ids[: max(sizes) * args.prompt_len].view(max(sizes), args.prompt_len)

    print(f"SmolLM2-135M, fp32, CPU, {torch.get_num_threads()} threads; greedy, {args.new_tokens} new tokens, "
          f"prompts of {args.prompt_len} tokens; best of {args.repeats}; load average before "
          f"{os.getloadavg()[0]:.2f}")
    for name, model in models.items():
        code = type(model).__module__.rpartition(".")[2]  # modeling_llama, or the checkpoint's modeling_sparsekd
        print(f"  {name:9s} {sum(p.numel() for p in model.parameters()):,} parameters ({type(model).__name__}, {code})")
    for name in models:  # warm-up: first-call allocations and lazy init stay out of the timings
        seconds_to_generate(models[name], prompts[:1], 2)
    print(f"{'batch':>5s} {'dense tok/s':>12s} {'factored tok/s':>15s} {'factored/dense':>15s}")
    for batch in sizes:
        best = {name: float("inf") for name in models}
        for _ in range(args.repeats):
            for name, model in models.items():
                best[name] = min(best[name], seconds_to_generate(model, prompts[:batch], args.new_tokens))
        rate = {name: batch * args.new_tokens / s for name, s in best.items()}
        print(f"{batch:5d} {rate['dense']:12.1f} {rate['factored']:15.1f} {rate['factored'] / rate['dense']:15.2f}")
    print(f"load average after {os.getloadavg()[0]:.2f} (2 cores; above ~2 other jobs shared them)")


if __name__ == "__main__":
    main()
