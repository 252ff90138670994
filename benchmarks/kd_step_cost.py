"""Cost of a distill step with the KD loss vs a plain CE step on the same batch (forward + backward).

    flock /tmp/sparsekd-heavy.lock python benchmarks/kd_step_cost.py [--model smollm2-135m --seq-len 256 --tail topk]

The teacher top-k comes from the model itself (as a cache would hold it). Steps alternate CE, KD, CE, KD ...;
the median of each is compared. No optimizer step (identical for both).
"""

import argparse
import statistics
import time

import torch

from sparsekd_core.cache import teacher_topk
from sparsekd_core.config import ModelConfig
from sparsekd_core.kd_loss import KDLoss, ce_loss
from sparsekd_core.models import load_model

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--seq-len", type=int, default=256)
parser.add_argument("--batch-size", type=int, default=1)
parser.add_argument("--tail", default="topk")
parser.add_argument("--repeats", type=int, default=4)
args = parser.parse_args()

loaded = load_model(ModelConfig(model=args.model, dtype="fp32"))
model = loaded.model.train()
ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
top, lp, tail = teacher_topk(model, ids, 32)
top, lp, tail = top.to(torch.int32), lp.half(), tail.half()
kd = KDLoss(alpha=0.5, temperature=2.0, tail=args.tail)


def step(use_kd: bool) -> float:
    t0 = time.perf_counter()
    logits = model(input_ids=ids, use_cache=False).logits
    loss = kd(logits, ids, top, lp, tail).loss if use_kd else ce_loss(logits, ids)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


step(False), step(True)  # warm up
ce_t, kd_t = [], []
for _ in range(args.repeats):
    ce_t.append(step(False))
    kd_t.append(step(True))
ce_m, kd_m = statistics.median(ce_t), statistics.median(kd_t)
print(f"CE step {ce_m:.3f}s, KD step ({args.tail}) {kd_m:.3f}s, ratio {kd_m / ce_m:.3f}  [{args.batch_size}x{args.seq_len} tokens]")
