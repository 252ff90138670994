"""Cross-check `sparsekd eval` against independent implementations, and its speed against a bare forward loop.

Independent references (no code shared with sparsekd_core.eval):
  * paper protocol: for each window from the protocol text, Hugging Face's own causal-LM loss
    (`model(x, labels=x).loss`, which shifts and averages internally) × the number of predicted tokens;
  * standard protocol: the sliding-window recipe of the transformers perplexity docs (labels masked with -100
    for the tokens an earlier window already scored).
Speed: a plain batch-1 `model(x)` loop over the same windows (forward only, no loss) vs sparsekd at batch 1,
and sparsekd at larger batch sizes. Best of `--repeats` runs each, interleaved.

    python benchmarks/eval_crosscheck.py --model smollm2-135m \
        --data ../shared/data/wikitext-2-raw/wiki.test.raw --max-tokens 8192
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from sparsekd_core.config import EvalConfig, ModelConfig
from sparsekd_core.data import load_text
from sparsekd_core.eval import perplexity, tokenize_text
from sparsekd_core.models import load_model


def protocol_windows(n: int, ctx: int, stride: int) -> list[tuple[int, int]]:
    out = []
    for start in range(0, n, stride):
        out.append((start, min(start + ctx, n)))
        if start + ctx >= n:
            break
    return out


@torch.inference_mode()
def reference_paper(model, ids, ctx, stride):
    nll_sum, count = 0.0, 0
    for b, e in protocol_windows(ids.numel(), ctx, stride):
        x = ids[b:e][None]
        loss = model(input_ids=x, labels=x).loss.double().item()
        nll_sum += loss * (e - b - 1)
        count += e - b - 1
    return math.exp(nll_sum / count), count


@torch.inference_mode()
def reference_standard(model, ids, ctx, stride):
    """The transformers docs recipe (perplexity of fixed-length models), summing NLL over scored tokens."""
    seq_len = ids.numel()
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + ctx, seq_len)
        trg_len = end - prev_end
        x = ids[begin:end][None]
        target = x.clone()
        target[:, :-trg_len] = -100
        loss = model(input_ids=x, labels=target).loss.double().item()
        # Labels the loss actually averaged over (HF shifts: label 0 is never predicted). The docs recipe
        # subtracts 1 per window instead, which miscounts windows whose first label is already masked.
        valid = (target[:, 1:] != -100).sum().item()
        nll_sum += loss * valid
        n_tokens += valid
        prev_end = end
        if end == seq_len:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


@torch.inference_mode()
def bare_forward_tokens_per_s(model, ids, ctx, stride):
    windows = protocol_windows(ids.numel(), ctx, stride)
    t0 = time.perf_counter()
    for b, e in windows:
        model(input_ids=ids[b:e][None], use_cache=False).logits
    return sum(e - b for b, e in windows) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="wikitext2:test")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--batch-sizes", default="4,8")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--speed-only", action="store_true", help="skip the perplexity cross-check")
    args = ap.parse_args()

    loaded = load_model(ModelConfig(model=args.model))
    model = loaded.model
    ids = tokenize_text(loaded.tokenizer, load_text(args.data), args.max_tokens)
    report: dict = {"model": args.model, "data": args.data, "text_tokens": int(ids.numel()), "threads": torch.get_num_threads()}

    checks = () if args.speed_only else (("paper", reference_paper), ("standard", reference_standard))
    for protocol, reference in checks:
        cfg = EvalConfig(ctx=args.ctx, stride=args.stride, protocol=protocol)
        ours = perplexity(model, ids, cfg)
        ref_ppl, ref_count = reference(model, ids, args.ctx, args.stride)
        report[protocol] = {
            "sparsekd_ppl": ours.ppl,
            "reference_ppl": ref_ppl,
            "rel_diff": abs(ours.ppl - ref_ppl) / ref_ppl,
            "sparsekd_tokens": ours.tokens,
            "reference_tokens": ref_count,
        }
        print(json.dumps({protocol: report[protocol]}), flush=True)

    cfg = EvalConfig(ctx=args.ctx, stride=args.stride, protocol="paper", batch_size=1)
    bare, ours1 = [], []
    for _ in range(args.repeats):  # interleaved, best of each
        bare.append(bare_forward_tokens_per_s(model, ids, args.ctx, args.stride))
        ours1.append(perplexity(model, ids, cfg).tokens_per_s)
    report["speed"] = {"bare_forward_b1_tokens_per_s": max(bare), "sparsekd_b1_tokens_per_s": max(ours1),
                       "ratio_b1": max(ours1) / max(bare)}
    for b in [int(x) for x in args.batch_sizes.split(",") if x]:
        tps = max(perplexity(model, ids, cfg.model_copy(update={"batch_size": b})).tokens_per_s for _ in range(args.repeats))
        report["speed"][f"sparsekd_b{b}_tokens_per_s"] = tps
    print(json.dumps({"speed": report["speed"]}), flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
