"""The benchmark ratios of docs/results/benchmarks.md, measured side by side in one run (figures, not tests).

    flock /tmp/sparsekd-heavy.lock python benchmarks/ratios.py [--skip-flow] [--json out.json]

1. eval: `sparsekd_core.eval.perplexity` tokens/s vs a bare batch-1 forward loop over the same windows
   (SmolLM2-135M, WikiText-2 test, paper protocol); goal ≥ 0.95×.
2. cache: `write_cache` tokens/s vs a bare forward over the same sequences, and bytes/token: format 2 (goal ≥ 0.9×),
   format 1 and the sampled cache (12 classes).
3. KD step vs CE step (forward + backward, same batch): time and peak memory, at SmolLM2's 49k vocabulary and at a
   151,936-token vocabulary (a randomly initialised Qwen3-0.6B-shaped model, config built in code); times from CE
   and KD steps interleaved in one process (medians), memory from each kind in a process of its own: the kernel's
   peak resident set (VmHWM) over its steps, reset after loading and a warm-up step, and the same above the RSS
   before them; goal ≤ 1.10× at 151k.
   And the two losses alone on random logits of both vocabulary sizes (no model around them).
4. prune: whitened tiered SVD of SmolLM2-135M to 35% MLP reduction (calibration included), seconds.
5. flow: a small dense-kd flow run twice in a fresh workdir: first run vs the cached rerun, seconds.
Best (eval, cache) or median (steps) of the repeats; the machine is described in the output.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, torch {torch.__version__} ({torch.get_num_threads()} "
            f"threads), python {platform.python_version()}")


def eval_ratio(loaded, max_tokens: int, repeats: int) -> dict:
    from sparsekd_core.config import EvalConfig
    from sparsekd_core.data import load_text
    from sparsekd_core.eval import make_windows, perplexity, tokenize_text

    ids = tokenize_text(loaded.tokenizer, load_text("wikitext2:test"), max_tokens)
    cfg = EvalConfig(ctx=512, stride=256, protocol="paper", batch_size=1)
    windows = make_windows(ids.numel(), cfg.ctx, cfg.stride, cfg.protocol)

    @torch.inference_mode()
    def bare() -> float:
        t0 = time.perf_counter()
        n = 0
        for w in windows:
            b, e = w.begin, w.end
            loaded.model(input_ids=ids[b:e][None], use_cache=False).logits
            n += e - b
        return n / (time.perf_counter() - t0)

    bare_tps, ours, ours4 = [], [], []
    for _ in range(repeats):  # interleaved
        bare_tps.append(bare())
        ours.append(perplexity(loaded.model, ids, cfg).tokens_per_s)
        ours4.append(perplexity(loaded.model, ids, cfg.model_copy(update={"batch_size": 4})).tokens_per_s)
    return {"bare_tokens_per_s": max(bare_tps), "eval_b1_tokens_per_s": max(ours), "eval_b4_tokens_per_s": max(ours4),
            "ratio_b1": max(ours) / max(bare_tps), "ratio_b4": max(ours4) / max(bare_tps)}


CACHE_KINDS = {"format 2": {}, "format 1": {"format": 1}, "sampled 12": {"teacher_sample": 12}}


def cache_ratio(loaded, num_samples: int, repeats: int, seq_len: int = 256, top_k: int = 32, keep: str | None = None,
                **settings) -> dict:
    """`write_cache` tokens/s over a bare forward of the same sequences (interleaved repeats, best of each), for the
    cache `settings` select (CacheConfig fields: format, teacher_sample, chunk_size, ...; default format 2). With
    `keep`, the last store written is moved there instead of deleted."""
    from sparsekd_core.cache import build_corpus, cache_fingerprint, write_cache
    from sparsekd_core.config import CacheConfig

    tmp = tempfile.mkdtemp()
    cfg = CacheConfig(out=f"{tmp}/c.zarr", data="mix:paper-offline", num_samples=num_samples, seq_len=seq_len,
                      top_k=top_k, **settings)
    ids = build_corpus(cfg, loaded.tokenizer, log=lambda m: None).input_ids
    fp = cache_fingerprint(loaded, cfg, ids)

    @torch.inference_mode()
    def bare() -> float:
        t0 = time.perf_counter()
        for i in range(ids.shape[0]):
            loaded.model(input_ids=ids[i : i + 1], use_cache=False).logits
        return ids.numel() / (time.perf_counter() - t0)

    bare_tps, cache_tps = [], []
    for _ in range(repeats):
        bare_tps.append(bare())
        shutil.rmtree(f"{tmp}/c.zarr", ignore_errors=True)
        res = write_cache(loaded.model, ids, cfg, fp, loaded.model.config.vocab_size, log=lambda m: None)
        cache_tps.append(res.tokens_per_s)
    if keep:
        shutil.move(f"{tmp}/c.zarr", keep)
    shutil.rmtree(tmp, ignore_errors=True)
    return {"bare_tokens_per_s": max(bare_tps), "cache_tokens_per_s": max(cache_tps),
            "ratio": max(cache_tps) / max(bare_tps), "bytes_per_token": res.bytes_per_token,
            "tokens": int(ids.numel())}


def _qwen3_shaped():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                      max_position_embeddings=4096)
    return Qwen3ForCausalLM(cfg).float().train()


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> int:
    """Return freed heap to the OS, reset the kernel's peak-RSS mark (VmHWM) and return the RSS now, in KiB."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def make_step(model, seq_len: int, batch_size: int = 1, tail: str = "topk"):
    """``step("ce" | "kd")``: one forward + backward of that loss (KD: α 0.5, T 2, the given tail) on a fixed random
    batch, the teacher top-k taken from the model itself (as a cache would hold it); no optimizer step (identical
    for both). Returns the step's seconds."""
    from sparsekd_core.cache import teacher_topk
    from sparsekd_core.kd_loss import KDLoss, ce_loss

    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    top, lp, tail_mass = teacher_topk(model, ids, 32)
    top, lp, tail_mass = top.to(torch.int32), lp.half(), tail_mass.half()
    kd = KDLoss(alpha=0.5, temperature=2.0, tail=tail)

    def step(which: str) -> float:
        t0 = time.perf_counter()
        logits = model(input_ids=ids, use_cache=False).logits
        loss = kd(logits, ids, top, lp, tail_mass).loss if which == "kd" else ce_loss(logits, ids)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step


def interleaved_medians(step, repeats: int) -> dict:
    """CE and KD steps alternated after one warm-up of each: {"ce_seconds", "kd_seconds"}, medians."""
    step("ce"), step("kd")
    times = {"ce": [], "kd": []}
    for _ in range(repeats):
        for which in times:
            times[which].append(step(which))
    return {f"{k}_seconds": statistics.median(v) for k, v in times.items()}


def _step_child(model_name: str, kind: str, seq_len: int, repeats: int, queue) -> None:
    """One process: ``kind`` ce or kd = that kind of step only, for its peak resident memory (and median time);
    ``both`` = CE and KD steps interleaved, for their median times side by side."""
    from sparsekd_core.config import ModelConfig
    from sparsekd_core.models import load_model

    if model_name == "qwen3-0.6b-shaped":
        model = _qwen3_shaped()
    else:
        model = load_model(ModelConfig(model=model_name, dtype="fp32")).model.train()
    step = make_step(model, seq_len)
    info = {"params": sum(p.numel() for p in model.parameters()), "vocab": model.config.vocab_size}
    if kind == "both":
        queue.put({**info, **interleaved_medians(step, repeats)})
        return
    step(kind)  # warm-up
    base = _reset_peak_rss()  # the peak below is the steps' own (loading and the teacher pass are forgotten)
    for _ in range(repeats):
        step(kind)
    queue.put({**info, "peak_rss_mib": _status_kib("VmHWM") / 1024, "base_rss_mib": base / 1024})


def step_ratio(model_name: str, seq_len: int, repeats: int) -> dict:
    ctx = mp.get_context("spawn")
    out = {}
    for kind in ("ce", "kd", "both"):
        queue = ctx.Queue()
        p = ctx.Process(target=_step_child, args=(model_name, kind, seq_len, repeats if kind == "both" else 2, queue))
        p.start()
        out[kind] = queue.get()
        p.join()
    return {"model": model_name, "vocab": out["kd"]["vocab"], "params": out["kd"]["params"], "tokens": seq_len,
            "ce_seconds": out["both"]["ce_seconds"], "kd_seconds": out["both"]["kd_seconds"],
            "time_ratio": out["both"]["kd_seconds"] / out["both"]["ce_seconds"],
            "ce_peak_mib": out["ce"]["peak_rss_mib"], "kd_peak_mib": out["kd"]["peak_rss_mib"],
            "ce_base_mib": out["ce"]["base_rss_mib"], "kd_base_mib": out["kd"]["base_rss_mib"],
            "memory_ratio": out["kd"]["peak_rss_mib"] / out["ce"]["peak_rss_mib"],
            "step_memory_ratio": (out["kd"]["peak_rss_mib"] - out["kd"]["base_rss_mib"])
            / max(1e-9, out["ce"]["peak_rss_mib"] - out["ce"]["base_rss_mib"])}


def loss_ratio(vocab: int, repeats: int) -> dict:
    """The losses alone, forward + backward on random fp32 logits [1, 256, vocab]: where a KD step's extra cost
    would show without the model around it. Interleaved; medians after one warm-up."""
    from sparsekd_core.kd_loss import KDLoss, ce_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 256, vocab, generator=g) * 3
    ids = torch.randint(0, vocab, (1, 256), generator=g)
    top, top_ids = torch.log_softmax(torch.randn(1, 256, vocab, generator=g), -1).topk(32, -1)
    tail = torch.log1p(-top.exp().sum(-1).clamp(max=0.999))
    kd = KDLoss(alpha=0.5, temperature=2.0, tail="topk")

    def run(kind: str) -> float:
        z = logits.clone().requires_grad_()
        t0 = time.perf_counter()
        (kd(z, ids, top_ids, top.half(), tail.half()).loss if kind == "kd" else ce_loss(z, ids)).backward()
        return time.perf_counter() - t0

    times = {"ce": [], "kd": []}
    for _ in range(repeats + 1):
        for kind in times:
            times[kind].append(run(kind))
    ce, kd_s = statistics.median(times["ce"][1:]), statistics.median(times["kd"][1:])
    return {"vocab": vocab, "ce_ms": 1e3 * ce, "kd_ms": 1e3 * kd_s, "ratio": kd_s / ce}


def prune_seconds(loaded) -> dict:
    from sparsekd_core.config import PruneConfig
    from sparsekd_core.prune import prune_model

    import copy

    model = copy.deepcopy(loaded.model)
    cfg = PruneConfig(method="svd", schedule="tiered", target_reduction=0.35, calibration="wikitext2:train")
    t0 = time.perf_counter()
    result = prune_model(model, loaded.tokenizer, cfg, log=lambda m: None)
    return {"seconds": time.perf_counter() - t0, "calibration_seconds": result.calibration_seconds,
            "mlp_reduction": result.summary()["mlp_reduction"]}


def flow_rerun(tmp: Path) -> dict:
    config = tmp / "dense-kd.yaml"
    config.write_text(
        f"model: smollm2-135m\nworkdir: {tmp / 'runs'}\n"
        "corpus: {data: \"mix:paper-offline\", num_samples: 8, seq_len: 128}\n"
        "distill: {max_steps: 4, batch_size: 2, eval_every: 0, val_tokens: 256}\n"
        "eval_sets: [{name: wikitext2, data: \"wikitext2:test\", max_tokens: 1024}]\n")
    seconds = []
    for _ in range(2):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "sparsekd", "run", "dense-kd", "--config", str(config), "--json"],
                       check=True, cwd=ROOT, capture_output=True)
        seconds.append(time.perf_counter() - t0)
    return {"first_seconds": seconds[0], "rerun_seconds": seconds[1], "ratio": seconds[1] / seconds[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--cache-samples", type=int, default=16)
    ap.add_argument("--step-repeats", type=int, default=3)
    ap.add_argument("--skip-flow", action="store_true")
    ap.add_argument("--only", help="comma-separated subset of eval,cache,step,loss,prune,flow")
    ap.add_argument("--model", default="smollm2-135m",
                    help="the real model of the eval, cache, step and prune rows (e.g. gemma3-270m; the step rows "
                         "add the Qwen3-0.6B-shaped model only for the default)")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--markdown", help="also write the table here (docs/results/benchmarks.md)")
    args = ap.parse_args()
    from sparsekd_core.config import ModelConfig
    from sparsekd_core.models import load_model

    only = set(args.only.split(",")) if args.only else {"eval", "cache", "step", "loss", "prune", "flow"}
    if args.skip_flow:
        only.discard("flow")
    report: dict = {"machine": machine(), "model": args.model}
    print(f"machine: {report['machine']}", flush=True)
    loaded = load_model(ModelConfig(model=args.model, dtype="fp32")) if only & {"eval", "cache", "prune"} else None
    if "eval" in only:
        report["eval"] = r = eval_ratio(loaded, args.eval_tokens, args.repeats)
        print(f"eval: bare forward {r['bare_tokens_per_s']:.0f} tok/s; sparsekd b1 {r['eval_b1_tokens_per_s']:.0f} "
              f"({r['ratio_b1']:.3f}×), b4 {r['eval_b4_tokens_per_s']:.0f} ({r['ratio_b4']:.3f}×)", flush=True)
    if "cache" in only:
        for kind, settings in CACHE_KINDS.items():
            key = "cache" if kind == "format 2" else f"cache {kind}"
            report[key] = r = cache_ratio(loaded, args.cache_samples, args.repeats, **settings)
            print(f"cache ({kind}): bare forward {r['bare_tokens_per_s']:.0f} tok/s; cache "
                  f"{r['cache_tokens_per_s']:.0f} ({r['ratio']:.3f}×); {r['bytes_per_token']:.1f} bytes/token",
                  flush=True)
    if "prune" in only:
        report["prune"] = r = prune_seconds(loaded)
        print(f"prune: SVD tiered whitened to {100 * r['mlp_reduction']:.1f}% MLP reduction: {r['seconds']:.1f} s "
              f"(calibration {r['calibration_seconds']:.1f} s)", flush=True)
    del loaded
    if "step" in only:
        for name in step_models(args.model):
            report[f"step_{name}"] = r = step_ratio(name, 256, args.step_repeats)
            print(f"step {name} (vocab {r['vocab']}, {r['params'] / 1e6:.0f}M params, 1×256): "
                  f"CE {r['ce_seconds']:.3f} s, "
                  f"KD {r['kd_seconds']:.3f} s ({r['time_ratio']:.3f}×); peak RSS CE {r['ce_peak_mib']:.0f} MiB, "
                  f"KD {r['kd_peak_mib']:.0f} MiB ({r['memory_ratio']:.3f}×; above start: "
                  f"{r['step_memory_ratio']:.3f}×)", flush=True)
    if "loss" in only:
        for vocab in (49152, 151936):
            report[f"loss_{vocab}"] = r = loss_ratio(vocab, 5)
            print(f"loss alone, vocab {vocab}: CE {r['ce_ms']:.1f} ms, KD {r['kd_ms']:.1f} ms ({r['ratio']:.3f}×)",
                  flush=True)
    if "flow" in only:
        with tempfile.TemporaryDirectory() as tmp:
            report["flow"] = r = flow_rerun(Path(tmp))
        print(f"flow: dense-kd first run {r['first_seconds']:.0f} s, cached rerun {r['rerun_seconds']:.0f} s "
              f"({r['ratio']:.3f}×)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(markdown(report, " ".join(sys.argv[1:])))


def step_models(model: str) -> tuple[str, ...]:
    return (model, "qwen3-0.6b-shaped") if model == "smollm2-135m" else (model,)


def markdown(report: dict, argv: str) -> str:
    """The benchmark table: each ratio beside its goal, and whether it is met."""
    rows = []

    def row(what: str, figures: str, ratio: float | None, goal: str, met: bool | None) -> None:
        verdict = "—" if met is None else ("met" if met else "**missed**")
        rows.append(f"| {what} | {figures} | {'—' if ratio is None else f'{ratio:.3f}×'} | {goal} | {verdict} |")

    if "eval" in report:
        r = report["eval"]
        row("eval (batch 1) vs bare batch-1 forward", f"{r['eval_b1_tokens_per_s']:.0f} vs "
            f"{r['bare_tokens_per_s']:.0f} tok/s", r["ratio_b1"], "≥ 0.95×", r["ratio_b1"] >= 0.95)
        row("eval (batch 4) vs bare batch-1 forward", f"{r['eval_b4_tokens_per_s']:.0f} vs "
            f"{r['bare_tokens_per_s']:.0f} tok/s", r["ratio_b4"], "≥ 0.95×", r["ratio_b4"] >= 0.95)
    for kind in CACHE_KINDS:
        r = report.get("cache" if kind == "format 2" else f"cache {kind}")
        if r is None:
            continue
        goal = "≥ 0.9×" if kind == "format 2" else None  # issue 16 set the goal for the compact top-k format
        row(f"cache write ({kind}) vs bare forward", f"{r['cache_tokens_per_s']:.0f} vs {r['bare_tokens_per_s']:.0f} "
            f"tok/s; {r['bytes_per_token']:.1f} bytes/token", r["ratio"], goal or "—",
            r["ratio"] >= 0.9 if goal else None)
    for name in step_models(report.get("model", "smollm2-135m")):
        r = report.get(f"step_{name}")
        if r is None:
            continue
        goal = "≤ 1.10×" if r["vocab"] > 100_000 else "(1.12× before)"
        row(f"KD step vs CE step, {name} (vocab {r['vocab']:,}, {r['params'] / 1e6:.0f}M params, 1×256 tokens)",
            f"{r['kd_seconds']:.3f} vs {r['ce_seconds']:.3f} s", r["time_ratio"], goal,
            r["time_ratio"] <= 1.10 if r["vocab"] > 100_000 else None)
        row(f"KD step vs CE step peak memory, {name}", f"{r['kd_peak_mib']:.0f} vs {r['ce_peak_mib']:.0f} MiB RSS "
            f"(above start: {r['kd_peak_mib'] - r['kd_base_mib']:.0f} vs "
            f"{r['ce_peak_mib'] - r['ce_base_mib']:.0f} MiB, "
            f"{r['step_memory_ratio']:.2f}×)", r["memory_ratio"], "—", None)
    for vocab in (49152, 151936):
        r = report.get(f"loss_{vocab}")
        if r is not None:
            row(f"KD loss vs CE loss alone (forward + backward on [1, 256, {vocab:,}] logits)",
                f"{r['kd_ms']:.1f} vs {r['ce_ms']:.1f} ms", r["ratio"], "—", None)
    if "prune" in report:
        r = report["prune"]
        row(f"SVD prune (whitened, tiered) of {report.get('model', 'smollm2-135m')}", f"{r['seconds']:.1f} s to "
            f"{100 * r['mlp_reduction']:.1f}% MLP reduction (calibration {r['calibration_seconds']:.1f} s)",
            None, "—", None)
    if "flow" in report:
        r = report["flow"]
        row("dense-kd flow: cached rerun vs first run", f"{r['rerun_seconds']:.0f} vs {r['first_seconds']:.0f} s",
            r["ratio"], "—", None)
    title = "# Benchmarks" if report.get("model", "smollm2-135m") == "smollm2-135m" else f"## {report['model']}"
    return (title + "\n\nGenerated by `python benchmarks/ratios.py " + argv + "` (each figure measured in that "
            "one run; best of the repeats for throughput, median of interleaved steps for step times; peak memory = "
            "the kernel's peak resident set (VmHWM) over the timed steps, each kind of step in a process of its "
            "own, reset after loading "
            "and a warm-up step; 'above start' = that peak minus the resident set just before the steps).\n\n"
            "**Machine**: " + report["machine"]
            + ". No GPU.\n\n| what | figures | ratio | goal | |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
