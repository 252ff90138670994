"""KD term from the stored cache (uint16 ids, fp16 log-probs, fp16 tail) vs from fp32 teacher outputs.

    flock /tmp/sparsekd-heavy.lock python benchmarks/cache_kd_agreement.py [--model smollm2-135m --num-samples 4]

Same sequences, same student (the model with noise on its MLP weights, and the dense model itself), every --tail.
"""

import argparse
import copy
import shutil
import tempfile

import torch

from sparsekd_core.cache import TeacherCache, build_corpus, cache_fingerprint, teacher_topk, write_cache
from sparsekd_core.config import CacheConfig, ModelConfig
from sparsekd_core.kd_loss import TAILS, KDLoss
from sparsekd_core.models import load_for

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--num-samples", type=int, default=4)
parser.add_argument("--seq-len", type=int, default=256)
parser.add_argument("--noise", type=float, default=0.5, help="MLP weight noise, as a fraction of each matrix's std")
args = parser.parse_args()

loaded = load_for("teacher", ModelConfig(model=args.model))  # fp32 teacher (precision.py)
tmp = tempfile.mkdtemp()
cfg = CacheConfig(out=f"{tmp}/c.zarr", data="mix:paper-offline", num_samples=args.num_samples, seq_len=args.seq_len,
                  chunk_size=args.num_samples)
ids = build_corpus(cfg, loaded.tokenizer, log=lambda m: None).input_ids
write_cache(loaded.model, ids, cfg, cache_fingerprint(loaded, cfg, ids), loaded.model.config.vocab_size, log=lambda m: None)
stored = TeacherCache(cfg.out)[list(range(ids.shape[0]))]
fp32 = dict(zip(("topk_ids", "topk_logprobs", "tail_logmass"), teacher_topk(loaded.model, ids, cfg.top_k)))

noised = copy.deepcopy(loaded.model)
torch.manual_seed(0)
with torch.no_grad():
    for name, p in noised.named_parameters():
        if ".mlp." in name:
            p.add_(args.noise * p.std() * torch.randn_like(p))
with torch.inference_mode():
    students = {"noised": noised(input_ids=ids).logits, "dense": loaded.model(input_ids=ids).logits}
for who, logits in students.items():
    for tail in TAILS:
        loss = KDLoss(alpha=1.0, temperature=2.0, tail=tail)
        a = loss(logits, ids, stored["topk_ids"], stored["topk_logprobs"], stored["tail_logmass"]).kd.item()
        b = loss(logits, ids, fp32["topk_ids"], fp32["topk_logprobs"], fp32["tail_logmass"]).kd.item()
        rel = abs(a - b) / abs(b) if b else float("nan")
        print(f"{who:6s} tail={tail:6s}: KD term stored {a:.6f} vs fp32 {b:.6f}  (abs diff {abs(a - b):.2e}, rel {rel:.2e})")
shutil.rmtree(tmp, ignore_errors=True)
