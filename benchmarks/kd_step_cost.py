"""Cost of a distill step with the KD loss vs a plain CE step on the same batch (forward + backward).

    flock /tmp/sparsekd-heavy.lock python benchmarks/kd_step_cost.py [--model smollm2-135m --seq-len 256 --tail topk]

The teacher top-k comes from the model itself (as a cache would hold it). Steps alternate CE, KD, CE, KD ...;
the median of each is compared. No optimizer step (identical for both). The step and the interleaving are
benchmarks/ratios.py's (its table measures the same at batch 1, each kind also in a process of its own for memory).
"""

import argparse
import sys
from pathlib import Path

from sparsekd_core.config import ModelConfig
from sparsekd_core.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ratios import interleaved_medians, make_step  # noqa: E402  (one implementation of the measurement)

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--seq-len", type=int, default=256)
parser.add_argument("--batch-size", type=int, default=1)
parser.add_argument("--tail", default="topk")
parser.add_argument("--repeats", type=int, default=4)
args = parser.parse_args()

model = load_model(ModelConfig(model=args.model, dtype="fp32")).model.train()
r = interleaved_medians(make_step(model, args.seq_len, args.batch_size, args.tail), args.repeats)
ce_m, kd_m = r["ce_seconds"], r["kd_seconds"]
print(f"CE step {ce_m:.3f}s, KD step ({args.tail}) {kd_m:.3f}s, ratio {kd_m / ce_m:.3f}  "
      f"[{args.batch_size}x{args.seq_len} tokens]")
