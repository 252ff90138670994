"""Pre-KD perplexity and pruning time of SmolLM2-135M after one round of SVD pruning (no distillation).

Two measurements on WikiText-2 test:
  * paper  — paper protocol (ctx 512, stride 256, every token of every window), first 8192 tokens;
  * issue  — non-overlapping 512-token windows (ctx = stride = 512), first 4096 tokens (issue 5's measurement).
Calibration: 32×256 tokens of wikitext2:train. Variants: plain SVD uniform / tiered (the paper's method),
whitened (activation-aware) SVD uniform / tiered / energy (whitened tiered = the `sparsekd prune` default).

Run (≈ 25 min on 2 CPU cores; one heavy job at a time):
    flock /tmp/sparsekd-heavy.lock python benchmarks/prune_pre_kd.py [--targets 0.15,0.35,0.65]
        [--variants whitened-tiered,whitened-uniform,whitened-energy,plain-uniform,plain-tiered]
        [--measurements paper,issue]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch

from sparsekd_core.config import EvalConfig, ModelConfig, PruneConfig
from sparsekd_core.data import load_text
from sparsekd_core.eval import perplexity, tokenize_text
from sparsekd_core.models import load_model
from sparsekd_core.prune import count_params, prune_model

MEASUREMENTS = {
    "paper": (8192, EvalConfig(ctx=512, stride=256, protocol="paper")),
    "issue": (4096, EvalConfig(ctx=512, stride=512, protocol="paper")),
}
VARIANTS = {
    "plain-uniform": dict(whiten=False, schedule="uniform"),
    "plain-tiered": dict(whiten=False, schedule="tiered"),
    "whitened-uniform": dict(whiten=True, schedule="uniform"),
    "whitened-tiered": dict(whiten=True, schedule="tiered"),
    "whitened-energy": dict(whiten=True, schedule="energy"),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="0.15,0.35,0.65")
    ap.add_argument("--variants", default="whitened-tiered,whitened-uniform,whitened-energy,plain-uniform,plain-tiered")
    ap.add_argument("--measurements", default="paper,issue")
    ap.add_argument("--damping", type=float, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    loaded = load_model(ModelConfig(model="smollm2-135m", dtype="fp32", device="cpu"), log=log)
    text = load_text("wikitext2:test")
    ids = {k: tokenize_text(loaded.tokenizer, text, n) for k, (n, _) in MEASUREMENTS.items()}
    measurements = args.measurements.split(",")

    def evaluate(model) -> dict:
        return {k: perplexity(model, ids[k], MEASUREMENTS[k][1]).ppl for k in measurements}

    dense = loaded.model
    rows = [{"variant": "dense", "target": 0.0, "mlp_reduction": 0.0, "prune_s": 0.0, **evaluate(dense),
             "total_params": count_params(dense)["total"]}]
    log(json.dumps(rows[-1]))
    for target in (float(t) for t in args.targets.split(",")):
        for variant in args.variants.split(","):
            model = copy.deepcopy(dense)
            extra = {} if args.damping is None else {"damping": args.damping}
            cfg = PruneConfig(target_reduction=target, **VARIANTS[variant], **extra)
            t0 = time.perf_counter()
            report = prune_model(model, loaded.tokenizer, cfg, parent="smollm2-135m", log=log)
            seconds = time.perf_counter() - t0
            summary = report.summary()
            rows.append({"variant": variant, "target": target, "mlp_reduction": summary["mlp_reduction"],
                         "prune_s": seconds, "calibration_s": report.calibration_seconds, **evaluate(model),
                         "total_params": summary["total_params_after"]})
            log(json.dumps(rows[-1]))
            del model
    header = ["variant", "target", "mlp_reduction", *measurements, "prune_s", "total_params"]
    print(" | ".join(header))
    for r in rows:
        print(" | ".join(f"{r[h]:.4g}" if isinstance(r[h], float) else str(r[h]) for h in header))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
