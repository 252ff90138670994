"""The one prepared GPU check: what sparsekd does on a GPU worker, measured in one run of <= 8 minutes (one H200).

    python benchmarks/gpu_check.py --out DIR [--model smollm2-135m | FILE.gguf | DIR] [--only eval,cache]
    python benchmarks/gpu_check.py --dry-run --out DIR      # every section on CPU with tiny models, in seconds

Writes DIR/gpu_check.json (the figures) and DIR/gpu_check.md (the same as tables) after every section, so a run
stopped at its time limit keeps what it measured. Sections:

* environment — torch, CUDA, GPU, driver; the bf16 GEMM rate measured here beside the GPU's datasheet peak.
* eval — the real model (SmolLM2-135M-Instruct, a Q4_1 GGUF dequantised to fp32): paper-protocol perplexity on
  the first 8,192 WikiText-2 test tokens in fp32 and in bf16 weights, and tokens/s at batch 1 and 16.
* cache — the teacher stage as a flow runs it (fp32 teacher, the GPU default batch): tokens/s of writing the
  format-2 store vs a bare forward of the same sequences at the same batch, bytes/token, and the log-prob error
  of the opt-in teacher precisions (tf32, bf16) against strict fp32.
* distill — a Qwen3-0.6B-shaped model with random weights (the numbers are about speed, not quality): a training
  step at 8 x 2048 tokens with fp32 master weights, bf16 autocast and fused AdamW, KD (top-32, its 151,936 vocab)
  vs plain CE, step time, model FLOPs utilisation against the bf16 peak, peak memory.
* profile — the same shape in bf16, dense vs SVD at 35% and 65% MLP reduction (the tiered ranks the pruner plans,
  random factors: timing only): prefill speedup at batch 1/16/64 against its Amdahl bound.
* projection — GPU-hours of the paper's programme (8 rounds of cache -> distill on 50,000 samples of 512 tokens,
  1 or 2 epochs, then evaluation) for Qwen3-0.6B and Phi-4-mini shapes, from the rates measured above.

A section that fails records its error and the others still run. On a host without pydantic/zarr/gguf run
benchmarks/gpu_kit.sh first (README: "Running the GPU check").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SECTIONS = ("environment", "eval", "cache", "distill", "profile", "sparse24", "projection")

# Dense bf16 tensor-core peaks (datasheet, without sparsity), FLOP/s: what MFU is reported against.
BF16_PEAK = {"H200": 989.4e12, "H100 SXM": 989.4e12, "H100 80GB HBM3": 989.4e12, "H100 PCIe": 756.0e12,
             "H100 NVL": 835.0e12, "A100": 312.0e12, "L40S": 362.0e12, "L4": 121.0e12, "A10G": 70.0e12}

QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                 max_position_embeddings=4096)
PHI4_MINI = dict(vocab_size=200064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                 num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True,
                 max_position_embeddings=4096)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=256)

# The paper's programme (DESIGN.md): 8 prune -> distill -> re-cache rounds on 50,000 samples of 512 tokens.
PROGRAMME = {"rounds": 8, "samples": 50_000, "seq_len": 512}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Wall seconds of fn(), the device synchronised before and after (the same clock for every figure here)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def bf16_peak(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAK.items():
        if all(part in name for part in key.split()):
            return name, peak
    return name, None


class Settings:
    """What each section runs on: the real sizes, or the tiny ones of --dry-run (CPU, seconds)."""

    def __init__(self, dry: bool):
        self.dry = dry
        self.eval_tokens = 512 if dry else 8192
        self.eval_ctx, self.eval_stride = (64, 32) if dry else (512, 256)
        self.cache_samples, self.cache_seq = (8, 32) if dry else (64, 512)
        self.cache_data = "wikitext2:train" if dry else "mix:paper-offline"  # the mixture takes ~10 s to build
        self.train_shape = TINY if dry else QWEN3_06B
        self.train_batch, self.train_seq = (2, 32) if dry else (8, 2048)
        self.train_steps = 2 if dry else 5
        self.profile_batches = [1, 2] if dry else [1, 16, 64]
        self.profile_seq = 16 if dry else 512
        self.gemm = 256 if dry else 8192


# ---------------------------------------------------------------------------------------------------- environment


def section_environment(device: torch.device, s: Settings, state: dict) -> dict:
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "transformers": transformers.__version__, "device": str(device), "cpu_threads": torch.get_num_threads()}
    name, peak = bf16_peak(device)
    out.update(gpu=name, bf16_peak_tflops_datasheet=None if peak is None else peak / 1e12)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(gpu_count=torch.cuda.device_count(), gpu_memory_gib=props.total_memory / 2**30,
                   capability=f"{props.major}.{props.minor}")
        try:
            out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            out["driver"] = None
    # The bf16 GEMM rate this device reaches (what a perfectly fed matmul gets; MFU is also given against it).
    n = s.gemm
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    reps = 3 if s.dry else 20
    seconds = timed(lambda: [a @ b for _ in range(reps)], device)
    out["gemm_tflops_measured"] = 2 * n**3 * reps / seconds / 1e12
    out["gemm"] = f"{n}x{n}x{n} {str(dtype).removeprefix('torch.')}"
    state["peak_flops"] = peak
    state["gemm_flops"] = out["gemm_tflops_measured"] * 1e12
    return out


# ---------------------------------------------------------------------------------------------------- models


def tiny_model_dir(root: Path) -> str:
    """A tiny random Llama + a BPE tokenizer trained on the packaged WikiText-2 valid text (--dry-run's 'real' model),
    saved like any HF directory so the run goes through sparsekd's own loader."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from sparsekd_core.data import load_text

    target = root / "tiny-llama"
    if (target / "config.json").is_file():
        return str(target)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([load_text("wikitext2:valid")[:200_000]], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**{k: v for k, v in TINY.items() if k != "head_dim"}, "vocab_size": len(tokenizer)})
    AutoModelForCausalLM.from_config(cfg).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return str(target)


def shaped_model(shape: dict, device: torch.device, dtype: torch.dtype):
    """A Qwen3-shaped causal LM with random weights, built on the device (no CPU init of 0.6B parameters)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(Qwen3Config(**shape), dtype=dtype)
    return model


def param_count(shape: dict, family: str = "qwen3") -> dict:
    """``model_counts`` of a shape, built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM, Phi3Config, Qwen3Config

    config = (Qwen3Config if family == "qwen3" else Phi3Config)(**shape)
    with torch.device("meta"):
        return model_counts(AutoModelForCausalLM.from_config(config))


def model_counts(model) -> dict:
    """{"total": parameters (tied ones once), "matmul": the weights a token multiplies (all but the embedding
    lookup; a tied LM head counts)}; forward FLOPs per token are 2·matmul."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    return {"total": total, "matmul": total - embedding + (embedding if model.config.tie_word_embeddings else 0)}


def train_flops_per_token(shape: dict, seq_len: int, family: str = "qwen3") -> float:
    """6·N (forward + backward of every matmul weight, the LM head included) + 12·layers·hidden·seq (attention
    scores and values; PaLM's convention, the causal half not subtracted)."""
    n = param_count(shape, family)["matmul"]
    return 6 * n + 12 * shape["num_hidden_layers"] * shape["hidden_size"] * seq_len


# ---------------------------------------------------------------------------------------------------- eval


def section_eval(device: torch.device, s: Settings, state: dict) -> dict:
    from sparsekd_core.config import EvalConfig, ModelConfig
    from sparsekd_core.data import load_text
    from sparsekd_core.eval import perplexity, tokenize_text
    from sparsekd_core.models import load_model

    out = {"model": state["model_label"], "tokens": s.eval_tokens, "protocol": "paper", "ctx": s.eval_ctx,
           "stride": s.eval_stride, "data": "wikitext2:test (first tokens)"}
    for dtype in ("fp32", "bf16"):
        t0 = time.perf_counter()
        loaded = load_model(ModelConfig(model=state["model"], dtype=dtype, device=str(device)), log=log)
        out[f"load_seconds_{dtype}"] = time.perf_counter() - t0
        ids = tokenize_text(loaded.tokenizer, load_text("wikitext2:test"), s.eval_tokens)
        for batch in (1, 16):
            cfg = EvalConfig(ctx=s.eval_ctx, stride=s.eval_stride, protocol="paper", batch_size=batch)
            perplexity(loaded.model, ids[: s.eval_ctx * 2], cfg)  # warm-up (kernels, allocator)
            res = perplexity(loaded.model, ids, cfg)
            out[f"ppl_{dtype}_b{batch}"] = res.ppl
            out[f"tokens_per_s_{dtype}_b{batch}"] = res.tokens_per_s
        out[f"ppl_{dtype}"] = out[f"ppl_{dtype}_b16"]
        del loaded
    out["ppl_bf16_over_fp32"] = out["ppl_bf16"] / out["ppl_fp32"]
    return out


# ---------------------------------------------------------------------------------------------------- cache


def section_cache(device: torch.device, s: Settings, state: dict, work: Path) -> dict:
    from sparsekd_core.cache import PROBE_SEQUENCES, build_corpus, run_cache, teacher_fidelity
    from sparsekd_core.config import CacheConfig, ModelConfig
    from sparsekd_core.models import load_for

    loaded = load_for("teacher", ModelConfig(model=state["model"], device=str(device)), log=log)
    cfg = CacheConfig(out=str(work / "teacher.zarr"), data=s.cache_data, num_samples=s.cache_samples,
                      seq_len=s.cache_seq, top_k=32)
    shutil.rmtree(cfg.out, ignore_errors=True)
    res = run_cache(loaded, cfg, log=log)
    ids = build_corpus(cfg, loaded.tokenizer, log=lambda m: None).input_ids
    batch = res.batch_size

    @torch.inference_mode()
    def bare() -> None:
        for b in range(0, ids.shape[0], batch):
            loaded.model(input_ids=ids[b : b + batch].to(device), use_cache=False).logits

    bare()
    bare_tps = max(ids.numel() / timed(bare, device) for _ in range(2))
    # The opt-ins against strict fp32 on the probe sequences (tf32 first: bf16 casts the model in place).
    fidelity = {p: teacher_fidelity(loaded.model, ids[:PROBE_SEQUENCES], 32, p, cfg.logprob_step)
                for p in ("tf32", "bf16")}
    shutil.rmtree(cfg.out, ignore_errors=True)
    return {"model": state["model_label"], "data": s.cache_data, "sequences": res.sequences, "seq_len": s.cache_seq, "batch_size": batch,
            "format": res.format, "top_k": 32, "teacher_precision": res.teacher_precision,
            "cache_tokens_per_s": res.tokens_per_s, "bare_forward_tokens_per_s": bare_tps,
            "cache_over_bare": res.tokens_per_s / bare_tps, "bytes_per_token": res.bytes_per_token,
            "matmul_parameters": model_counts(loaded.model)["matmul"],
            "fidelity": {p: {k: v for k, v in f.items() if k not in ("precision", "reference")}
                         for p, f in fidelity.items()}}


# ---------------------------------------------------------------------------------------------------- distill


def section_distill(device: torch.device, s: Settings, state: dict) -> dict:
    from sparsekd_core import precision
    from sparsekd_core.kd_loss import KDLoss, ce_loss

    shape = s.train_shape
    model = shaped_model(shape, device, torch.float32).train()  # fp32 master weights
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    B, L, V, k = s.train_batch, s.train_seq, shape["vocab_size"], 32
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (B, L), generator=g).to(device)
    top = torch.randint(0, V, (B, L, k), generator=g).to(device)  # a synthetic cache batch: only its shape matters
    logprobs = torch.log_softmax(torch.randn(B, L, k + 1, generator=g), -1)
    top_lp, tail = logprobs[..., :k].sort(-1, descending=True).values.to(device), logprobs[..., k].to(device)
    kd = KDLoss(alpha=0.5, temperature=2.0, tail="topk")

    def step(which: str) -> None:
        with precision.autocast(device, "auto"):
            logits = model(input_ids=ids, use_cache=False).logits
        loss = kd(logits, ids, top, top_lp, tail).loss if which == "kd" else ce_loss(logits, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    out = {"shape": "Qwen3-0.6B (random weights)" if not s.dry else "tiny Qwen3 (dry run)",
           "parameters": param_count(shape)["total"], "batch": B, "seq_len": L, "tokens_per_step": B * L,
           "precision": precision.describe(device, "auto") + (", fused AdamW" if device.type == "cuda" else ""),
           "flops_per_token": train_flops_per_token(shape, L)}
    for which in ("ce", "kd"):
        step(which)  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = [timed(lambda: step(which), device) for _ in range(s.train_steps)]
        seconds = statistics.median(times)
        out[f"{which}_step_seconds"] = seconds
        out[f"{which}_tokens_per_s"] = B * L / seconds
        achieved = out["flops_per_token"] * B * L / seconds
        out[f"{which}_tflops"] = achieved / 1e12
        if state.get("peak_flops"):
            out[f"{which}_mfu_datasheet"] = achieved / state["peak_flops"]
        if state.get("gemm_flops"):
            out[f"{which}_mfu_measured_gemm"] = achieved / state["gemm_flops"]
        if device.type == "cuda":
            out[f"{which}_peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    out["kd_over_ce"] = out["kd_step_seconds"] / out["ce_step_seconds"]
    state["train_tokens_per_s"] = out["kd_tokens_per_s"]
    state["train_flops"] = out["kd_tflops"] * 1e12
    del model, optimizer
    return out


# ---------------------------------------------------------------------------------------------------- profile


def factored_like(shape: dict, device: torch.device, reduction: float):
    """The shape with every MLP matrix at the rank the pruner plans for ``reduction`` (tiered schedule, the default)
    and random factors: a prefill costs what the pruned model's costs (timing only)."""
    from sparsekd_core.config import PruneConfig
    from sparsekd_core.prune.lowrank import LowRankLinear, find_mlp_matrices, set_module
    from sparsekd_core.prune.report import dense_mlp_params
    from sparsekd_core.prune.svd import plan_ranks

    model = shaped_model(shape, device, torch.bfloat16).eval()
    matrices = find_mlp_matrices(model)
    cfg = PruneConfig(method="svd", target_reduction=reduction, calibration="none")
    dense = dense_mlp_params(model)
    for m, rank in zip(matrices, plan_ranks(matrices, cfg, dense)):
        if rank is not None:
            out_f, in_f = m.shape
            set_module(model, m.name, LowRankLinear(in_f, out_f, rank, bias=False, device=device,
                                                    dtype=torch.bfloat16))
    after = sum(p.numel() for mm in find_mlp_matrices(model) for p in model.get_submodule(mm.name).parameters())
    return model, 1 - after / dense


def section_profile(device: torch.device, s: Settings, state: dict) -> dict:
    from sparsekd_core.config import ProfileConfig
    from sparsekd_core.profile import add_speedups, profile_model

    cfg = ProfileConfig(batch_sizes=s.profile_batches, seq_len=[s.profile_seq], new_tokens=4 if s.dry else 8,
                        warmup=1, repeats=1 if s.dry else 3)
    results, reductions = [], {}
    for index, target in enumerate((0.0, 0.35, 0.65)):
        if target == 0.0:
            model, achieved = shaped_model(s.train_shape, device, torch.bfloat16).eval(), 0.0
        else:
            model, achieved = factored_like(s.train_shape, device, target)
        label = "dense" if target == 0.0 else f"svd {target:.0%}"
        reductions[label] = achieved
        results += profile_model(label, model, cfg, index)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    add_speedups(results)
    keep = ("model", "batch_size", "seq_len", "ttft_ms", "tpot_ms", "ffn_fraction", "ffn_flop_ratio", "speedup",
            "amdahl_bound", "efficiency", "peak_mem_bytes", "bound", "gpu_busy_fraction")
    return {"shape": "Qwen3-0.6B (random weights), bf16" if not s.dry else "tiny Qwen3 (dry run)",
            "mlp_reduction": reductions, "cells": [{k: r.get(k) for k in keep} for r in results]}


# ---------------------------------------------------------------------------------------------------- 2:4 sparsity


def section_sparse24(device: torch.device, s: Settings, state: dict) -> dict:
    """A WANDA 2:4 MLP matrix (sparsekd's own mask, prune/wanda.py) as the GPU runs it: the dense matmul against
    ``torch.sparse.to_sparse_semi_structured`` at a decode-sized and a prefill-sized token batch, in bf16, on the
    down_proj shape of Qwen3-0.6B. Where semi-structured kernels do not exist (a CPU, an older GPU) the dense time
    is measured and the row says the pattern is counted, not accelerated."""
    import torch.nn.functional as F

    from sparsekd_core.prune.wanda import wanda_mask_2_4

    hidden, inter = (TINY if s.dry else QWEN3_06B)["hidden_size"], (TINY if s.dry else QWEN3_06B)["intermediate_size"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    weight = torch.randn(hidden, inter, device=device, dtype=dtype)  # down_proj [out, in]
    mask, _ = wanda_mask_2_4(weight.float(), torch.rand(inter, device=device) + 0.1)
    weight = weight.masked_fill(mask, 0)
    groups = (weight == 0).reshape(hidden, -1, 4).sum(-1)
    out: dict = {"shape": f"down_proj {hidden}x{inter}, {str(dtype).removeprefix('torch.')}",
                 "zero_fraction": float((weight == 0).float().mean()),
                 "groups_with_two_zeros": float((groups == 2).float().mean())}
    try:
        from torch.sparse import to_sparse_semi_structured

        sparse = to_sparse_semi_structured(weight)
    except Exception as err:  # noqa: BLE001 - no kernel here: the finding is that it is not accelerated
        sparse, out["accelerated"] = None, False
        out["note"] = f"to_sparse_semi_structured unavailable on {device.type} ({type(err).__name__}): counted, " \
                      "not accelerated"
    def best_ms(fn) -> float:  # one matmul is microseconds: warm up, then the best of several
        fn()
        return min(timed(fn, device) for _ in range(3 if s.dry else 50)) * 1e3

    for label, tokens in (("decode_b16", 16), ("prefill_4k", 256 if s.dry else 4096)):
        x = torch.randn(tokens, inter, device=device, dtype=dtype)
        out[f"dense_ms_{label}"] = best_ms(lambda: F.linear(x, weight))
        if sparse is not None:
            out[f"sparse_ms_{label}"] = best_ms(lambda: F.linear(x, sparse))
            out[f"speedup_{label}"] = out[f"dense_ms_{label}"] / out[f"sparse_ms_{label}"]
            out["max_abs_error"] = float((F.linear(x, sparse) - F.linear(x, weight)).abs().max())
    if sparse is not None:
        out["accelerated"] = True
    return out


# ---------------------------------------------------------------------------------------------------- projection


def section_projection(device: torch.device, s: Settings, state: dict, report: dict) -> dict:
    """GPU-hours of the paper's programme from the measured rates: training at the MFU measured on the 0.6B shape
    (the same MFU assumed for Phi-4-mini), the teacher pass at the cache rate measured on SmolLM2 scaled by forward
    FLOPs. Evaluation and pruning are minutes and left out."""
    distill, cache = report.get("distill", {}), report.get("cache", {})
    if "kd_tflops" not in distill or "cache_tokens_per_s" not in cache:
        raise RuntimeError("needs the distill and cache sections' figures")
    train_flops = distill["kd_tflops"] * 1e12
    cache_flops = cache["cache_tokens_per_s"] * 2 * cache["matmul_parameters"]  # forward FLOPs of the cached model
    tokens = PROGRAMME["samples"] * PROGRAMME["seq_len"]
    out = {"programme": dict(PROGRAMME, tokens_per_pass=tokens),
           "assumptions": "training at the KD step's measured FLOP/s on the Qwen3-0.6B shape; teacher caching at "
                          "the measured cache FLOP/s (SmolLM2, fp32 teacher) scaled by forward FLOPs; one dense "
                          "cache + one re-cache per round; evaluation and pruning not counted",
           "models": {}}
    for name, shape, family in (("Qwen3-0.6B", QWEN3_06B, "qwen3"), ("Phi-4-mini", PHI4_MINI, "phi3")):
        train_s = tokens * train_flops_per_token(shape, PROGRAMME["seq_len"], family) / train_flops
        cache_s = tokens * 2 * param_count(shape, family)["matmul"] / cache_flops
        per = {}
        for epochs in (1, 2):
            total = PROGRAMME["rounds"] * (epochs * train_s + cache_s) + cache_s
            per[f"{epochs}_epoch"] = total / 3600
        out["models"][name] = {"parameters": param_count(shape, family)["total"], "distill_hours_per_epoch":
                               train_s / 3600, "cache_hours_per_pass": cache_s / 3600,
                               "programme_gpu_hours": per}
    return out


# ---------------------------------------------------------------------------------------------------- report


def markdown(report: dict) -> str:
    lines = ["# GPU check", "", f"Command: `{report['command']}` ({report['started']})", ""]
    if report.get("dry_run"):
        lines += ["**Dry run**: tiny random models on the CPU. These figures test the script; they say nothing "
                  "about a GPU.", ""]
    env = report.get("environment", {})
    if "error" not in env and env:
        lines += ["## environment", "", "| what | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in env.items()]
        lines.append("")
    for name in SECTIONS[1:]:
        sec = report.get(name)
        if sec is None:
            continue
        lines += [f"## {name}", ""]
        if "error" in sec:
            lines += ["Failed: `" + sec["error"].splitlines()[-1] + "`", ""]
            continue
        if name == "profile":
            lines += [f"{sec['shape']}; achieved MLP reductions: "
                      + ", ".join(f"{k} {v:.3f}" for k, v in sec["mlp_reduction"].items()), "",
                      "| model | batch | seq | TTFT ms | FFN time share | FFN FLOP ratio | speedup | Amdahl bound | "
                      "efficiency | peak MiB | bound |", "|" + "---|" * 11]
            for c in sec["cells"]:
                lines.append(f"| {c['model']} | {c['batch_size']} | {c['seq_len']} | {_fmt(c['ttft_ms'])} | "
                             f"{_fmt(c['ffn_fraction'])} | {_fmt(c['ffn_flop_ratio'])} | {_fmt(c['speedup'])} | "
                             f"{_fmt(c['amdahl_bound'])} | {_fmt(c['efficiency'])} | "
                             f"{_fmt((c['peak_mem_bytes'] or 0) / 2**20)} | {c.get('bound')} |")
            lines.append("")
            continue
        if name == "projection":
            lines += [sec["assumptions"], "", "| model | parameters | distill h/epoch | cache h/pass | "
                      "programme GPU-h (1 epoch) | (2 epochs) |", "|---|---|---|---|---|---|"]
            for model, m in sec["models"].items():
                lines.append(f"| {model} | {m['parameters'] / 1e9:.2f}B | {_fmt(m['distill_hours_per_epoch'])} | "
                             f"{_fmt(m['cache_hours_per_pass'])} | {_fmt(m['programme_gpu_hours']['1_epoch'])} | "
                             f"{_fmt(m['programme_gpu_hours']['2_epoch'])} |")
            lines.append("")
            continue
        lines += ["| what | value |", "|---|---|"]
        for k, v in sec.items():
            if isinstance(v, dict):
                for kk, vv in v.items():
                    text = ", ".join(f"{a} {_fmt(b)}" for a, b in vv.items()) if isinstance(vv, dict) else _fmt(vv)
                    lines.append(f"| {k}.{kk} | {text} |")
            else:
                lines.append(f"| {k} | {_fmt(v)} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != v or math.isinf(v):
            return str(v)
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def write(out: Path, report: dict) -> None:
    from sparsekd_core.files import write_json_atomic, write_text_atomic

    write_json_atomic(out / "gpu_check.json", report)
    write_text_atomic(out / "gpu_check.md", markdown(report))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for gpu_check.json and gpu_check.md")
    parser.add_argument("--model", default="smollm2-135m", help="the real model of the eval and cache sections")
    parser.add_argument("--only", help=f"comma-separated sections (default all: {','.join(SECTIONS)})")
    parser.add_argument("--dry-run", action="store_true", help="every section on CPU with tiny models (seconds)")
    parser.add_argument("--device", default=None, help="default: cuda when available (cpu for --dry-run)")
    args = parser.parse_args(argv)
    only = [x.strip() for x in (args.only or ",".join(SECTIONS)).split(",") if x.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        print(f"gpu_check: unknown section(s) {unknown}; allowed: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda"))
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    s = Settings(args.dry_run)
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    state: dict = {"model": args.model, "model_label": args.model}
    if args.dry_run:
        state["model"] = tiny_model_dir(work)
        state["model_label"] = "tiny random Llama (dry run)"
    elif args.model == "smollm2-135m":
        state["model_label"] = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)"
    report: dict = {"command": " ".join([Path(sys.argv[0]).name if argv is None else "gpu_check.py",
                                         *(sys.argv[1:] if argv is None else argv)]),
                    "dry_run": args.dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    t_all = time.perf_counter()
    runners = {"environment": lambda: section_environment(device, s, state),
               "eval": lambda: section_eval(device, s, state),
               "cache": lambda: section_cache(device, s, state, work),
               "distill": lambda: section_distill(device, s, state),
               "profile": lambda: section_profile(device, s, state),
               "sparse24": lambda: section_sparse24(device, s, state),
               "projection": lambda: section_projection(device, s, state, report)}
    try:
        for name in SECTIONS:
            if name not in only:
                continue
            log(f"gpu_check: {name} ...")
            t0 = time.perf_counter()
            try:
                report[name] = runners[name]()
            except Exception:  # noqa: BLE001 - one section's failure is a finding; the others still run
                report[name] = {"error": traceback.format_exc()}
                log(report[name]["error"])
            report[name]["seconds"] = time.perf_counter() - t0
            if device.type == "cuda":
                torch.cuda.empty_cache()
            write(out, report)
            log(f"gpu_check: {name} done in {report[name]['seconds']:.1f}s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = time.perf_counter() - t_all
    write(out, report)
    failed = [n for n in only if "error" in report.get(n, {})]
    log(f"gpu_check: {len(only) - len(failed)}/{len(only)} sections in {report['seconds']:.0f}s -> {out}"
        + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
