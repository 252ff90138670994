#!/bin/bash
# The issue-4 end-to-end check on SmolLM2-135M: cache (uninterrupted, and killed -9 + resumed: byte-identical),
# distill of the dense model on its own cache (KD term starts at 0) and of an MLP-noised student (killed after its
# first checkpoint, resumed), then the three benchmarks. Usage (one heavy job at a time on a shared machine):
#   flock /tmp/sparsekd-heavy.lock benchmarks/e2e_smollm2.sh      (PY=python interpreter, E=work directory)
set -x
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false
PY=${PY:-python}
export E=${E:-/tmp/sparsekd-e2e}
rm -rf $E; mkdir -p $E
CACHE_ARGS="cache --model smollm2-135m --data mix:paper-offline --num-samples 64 --seq-len 256 --json"
# 1. uninterrupted cache
date; $PY -m sparsekd $CACHE_ARGS --out $E/clean.zarr > $E/cache_clean.json 2> $E/cache_clean.err; tail -1 $E/cache_clean.json
# 2. killed cache: kill -9 once 2 chunks are done, rerun
$PY -m sparsekd $CACHE_ARGS --out $E/teacher.zarr > $E/cache_killed.json 2> $E/cache_killed.err &
PID=$!
while [ "$(ls $E/teacher.zarr/chunk_done/c 2>/dev/null | wc -l)" -lt 2 ]; do sleep 0.5; done; sleep 3
kill -9 $PID; wait $PID; echo "killed rc=$?"; ls $E/teacher.zarr/chunk_done/c
$PY -m sparsekd $CACHE_ARGS --out $E/teacher.zarr > $E/cache_resumed.json 2> $E/cache_resumed.err; tail -1 $E/cache_resumed.json
$PY - <<'PY'
import os, zarr, numpy as np, pathlib
a = zarr.open_group(os.environ["E"] + "/teacher.zarr", mode="r"); b = zarr.open_group(os.environ["E"] + "/clean.zarr", mode="r")
for n in ("input_ids", "topk_ids", "topk_logprobs", "tail_logmass"):
    same = np.array_equal(a[n][:], b[n][:])
    fa = {p.relative_to(os.environ["E"] + "/teacher.zarr"): p.read_bytes() for p in pathlib.Path(os.environ["E"] + "/teacher.zarr", n).rglob("*") if p.is_file()}
    fb = {p.relative_to(os.environ["E"] + "/clean.zarr"): p.read_bytes() for p in pathlib.Path(os.environ["E"] + "/clean.zarr", n).rglob("*") if p.is_file()}
    print(n, "arrays equal:", same, "chunk files byte-identical:", fa == fb)
PY
# 3. noised student (noise on MLP weights)
$PY - <<'PY'
import os, torch
from sparsekd_core.config import ModelConfig
from sparsekd_core.models import load_model
lm = load_model(ModelConfig(model="smollm2-135m"))
torch.manual_seed(0)
with torch.no_grad():
    for name, p in lm.model.named_parameters():
        if ".mlp." in name:
            p.add_(0.2 * p.std() * torch.randn_like(p))
lm.model.save_pretrained(os.environ["E"] + "/noised"); lm.tokenizer.save_pretrained(os.environ["E"] + "/noised")
PY
DARGS="--cache $E/teacher.zarr --max-steps 30 --lr 5e-5 --temperature 2.0 --json"
# 4. dense on its own cache (default --tail topk)
date; $PY -m sparsekd distill --student smollm2-135m $DARGS --out $E/dense > $E/distill_dense.json 2> $E/distill_dense.err; tail -1 $E/distill_dense.json
# 5. noised student, killed after its first checkpoint (step 10), then resumed
$PY -m sparsekd distill --student $E/noised $DARGS --out $E/noised_kd > $E/distill_noised_killed.json 2> $E/distill_noised_killed.err &
PID=$!
while [ ! -f $E/noised_kd/checkpoint/state.pt ]; do sleep 0.5; done; sleep 5
kill -9 $PID; wait $PID; echo "killed rc=$?"
date; $PY -m sparsekd distill --student $E/noised $DARGS --out $E/noised_kd > $E/distill_noised.json 2> $E/distill_noised.err; tail -1 $E/distill_noised.json
date
# 6. benchmarks
$PY benchmarks/cache_kd_agreement.py 2>/dev/null
$PY benchmarks/kd_step_cost.py 2>/dev/null
$PY benchmarks/cache_throughput.py 2>/dev/null
date
