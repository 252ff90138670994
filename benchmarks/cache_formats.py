"""Teacher cache formats side by side on the same sequences: bytes/token, write throughput vs a bare forward pass,
and how far the KD term and its gradient move from an fp32 teacher (top-k formats).

    python benchmarks/cache_formats.py [--model smollm2-135m --num-samples 16 --seq-len 256 --top-k 32 --sample 12]

Formats: 1 (fp16 log-probs), 2 (log-probs as whole steps of --step nats below the position's top-1), and the
sampled-class cache (--sample classes per position). Write throughput = tokens per second of `write_cache` (forward
+ top-k or sampling + encoding + compressed Zarr writes) over the same for the bare forward, best of --repeats each,
the bare passes interleaved with that format's writes (a best of all bare passes against a best of one format's
writes would favour the bare side).
Fidelity: the student is the model with noise on its MLP weights; the KD term (tail topk, T = 2) and the gradient of
the KD term with respect to every parameter (one backward over --grad-samples sequences) from the decoded cache vs
from the fp32 teacher outputs; relative differences (gradient: ||g − g_fp32|| / ||g_fp32||).
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from sparsekd_core.cache import TeacherCache, build_corpus, teacher_topk
from sparsekd_core.config import CacheConfig, ModelConfig
from sparsekd_core.kd_loss import KDLoss
from sparsekd_core.models import load_for

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ratios import cache_ratio  # noqa: E402  (one implementation of the write-vs-bare measurement)

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--num-samples", type=int, default=16)
parser.add_argument("--seq-len", type=int, default=256)
parser.add_argument("--top-k", type=int, default=32)
parser.add_argument("--step", type=float, default=0.02)
parser.add_argument("--sample", type=int, default=12)
parser.add_argument("--repeats", type=int, default=2)
parser.add_argument("--grad-samples", type=int, default=4)
parser.add_argument("--noise", type=float, default=0.5, help="MLP weight noise of the student (fraction of std)")
args = parser.parse_args()

loaded = load_for("teacher", ModelConfig(model=args.model))  # fp32 teacher (precision.py)
model = loaded.model
tmp = tempfile.mkdtemp()
base = CacheConfig(out=f"{tmp}/c.zarr", data="mix:paper-offline", num_samples=args.num_samples, seq_len=args.seq_len,
                   top_k=args.top_k, chunk_size=4, logprob_step=args.step)
ids = build_corpus(base, loaded.tokenizer, log=lambda m: None).input_ids  # the corpus cache_ratio builds too
formats = {"format 1 (fp16 log-probs)": {"format": 1},
           f"format 2 (step {args.step})": {"format": 2},
           f"sampled, {args.sample} classes": {"teacher_sample": args.sample}}

rows = {}
for name, fields in formats.items():
    out = f"{tmp}/{len(rows)}.zarr"
    r = cache_ratio(loaded, args.num_samples, args.repeats, seq_len=args.seq_len, top_k=args.top_k, keep=out,
                    chunk_size=base.chunk_size, logprob_step=args.step, **fields)
    rows[name] = (r["bytes_per_token"], r["cache_tokens_per_s"], r["bare_tokens_per_s"], out)

# Fidelity of the top-k formats: KD term and parameter gradient vs the fp32 teacher outputs.
x = ids[: args.grad_samples]
reference = teacher_topk(model, x, args.top_k)
reference = [t.clone() for t in reference]  # out of inference mode
student = copy.deepcopy(model)
torch.manual_seed(0)
with torch.no_grad():
    for pname, p in student.named_parameters():
        if ".mlp." in pname:
            p.add_(args.noise * p.std() * torch.randn_like(p))
loss = KDLoss(alpha=1.0, temperature=2.0, tail="topk")


def kd_and_grad(top_ids, logprobs, tail):
    student.zero_grad(set_to_none=True)
    out = loss(student(input_ids=x).logits, x, top_ids, logprobs, tail)
    out.kd.backward()
    return out.kd.item(), torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])


kd_ref, g_ref = kd_and_grad(*reference)
print(f"{args.model}: {args.num_samples}x{args.seq_len} tokens of mix:paper-offline, k={args.top_k}, chunks of 4; "
      f"best of {args.repeats} interleaved writes and bare forwards per format")
print("| cache | bytes/token | write tokens/s | bare forward tokens/s | vs bare forward | KD term rel. diff | "
      "gradient rel. diff |")
print("|---|---|---|---|---|---|---|")
for name, (bpt, tps, bare_tps, out) in rows.items():
    fidelity = "— | —"
    if "sampled" not in name:
        got = TeacherCache(out)[list(range(args.grad_samples))]
        kd, g = kd_and_grad(got["topk_ids"], got["topk_logprobs"], got["tail_logmass"])
        fidelity = f"{abs(kd - kd_ref) / kd_ref:.1e} | {((g - g_ref).norm() / g_ref.norm()).item():.1e}"
    print(f"| {name} | {bpt:.1f} | {tps:.0f} | {bare_tps:.0f} | {tps / bare_tps:.2f}x | {fidelity} |")
shutil.rmtree(tmp, ignore_errors=True)
