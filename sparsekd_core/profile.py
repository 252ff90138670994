"""Inference profiling: TTFT/TPOT, memory, where the time goes (attention vs FFN), FLOPs and the Amdahl bound.

Timing. Prefill latency (TTFT) is one forward over ``[batch, seq_len]`` random token ids that returns the first
new token's logits (the last position's only, ``logits_to_keep=1``, as ``generate`` does); decode latency (TPOT)
is the mean time of one cached single-token step over ``new_tokens`` greedy steps. Each is measured after
``warmup`` untimed runs, ``repeats`` times, and reported as median / min / max. On CUDA the times come from CUDA
events around the work (with synchronisation); on CPU from the wall clock.

Memory. CUDA: ``torch.cuda.max_memory_allocated`` during the timed runs minus what was allocated before.
CPU: the peak resident set size seen by a 2 ms sampler thread during the timed runs minus the RSS before
(an approximation: allocations shorter than the sampling period can be missed).

Breakdown (of that same prefill forward). Forward hooks open a ``torch.profiler.record_function`` range around
every attention module and every MLP module of every decoder layer, and one around the whole forward;
``torch.profiler`` then gives each range's total time (device time on CUDA, CPU time on CPU).
``other = total - attention - ffn`` (embeddings, norms, LM head, glue). Attribution is by module, never by kernel name.

FLOPs (analytic, per forward, multiply-add = 2 FLOPs): every ``nn.Linear`` inside an attention or MLP module
counts ``2·in·out`` per token (so a factored MLP counts its two thin linears), plus attention's score and value
products ``2·2·heads·head_dim·(keys attended)`` per token (causal: query i attends to i+1 keys in prefill),
plus the LM head (on the last position only). Weight bytes = the bytes of the parameters of each part.

Amdahl bound on prefill speedup for a compressed model, from the *dense* (first) model's breakdown:
``bound = 1 / ((1 - f_ffn) + f_ffn · flops_ffn_compressed / flops_ffn_dense)`` with ``f_ffn`` the dense FFN time
fraction; ``efficiency = measured speedup / bound`` (the paper: 1.17× of a 1.29× bound = 90%).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
import torch

from .config import ProfileConfig
from .files import write_file_atomic

ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")


def _part_modules(model: torch.nn.Module) -> dict[str, list[tuple[str, torch.nn.Module]]]:
    """Attention and MLP modules of the decoder layers, found by their attribute name inside each layer."""
    parts: dict[str, list[tuple[str, torch.nn.Module]]] = {"attention": [], "ffn": []}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        if not parent or not parent.rsplit(".", 1)[-1].isdigit():  # only direct children of a layer `layers.N`
            continue
        if leaf in ATTENTION_NAMES:
            parts["attention"].append((name, module))
        elif leaf in MLP_NAMES:
            parts["ffn"].append((name, module))
    if not parts["attention"] or not parts["ffn"]:
        raise ValueError("could not find attention/MLP modules (expected layers.N.self_attn and layers.N.mlp)")
    return parts


# ---------------------------------------------------------------------------------------------------- FLOPs, bytes


def _linear_flops_per_token(module: torch.nn.Module) -> int:
    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear))


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def flop_accounting(model: torch.nn.Module, batch_size: int, seq_len: int) -> dict:
    """Analytic FLOPs of one prefill forward of [batch_size, seq_len] and weight bytes, per part.

    attention: q/k/v/o projections (2·in·out per token) + QKᵀ and AV (2·head_dim per key per head each, causal:
    Σ_i (i+1) = S(S+1)/2 keys per sequence); ffn: its linears; lm_head: 2·hidden·vocab per sequence (the prefill
    computes the last position's logits only).
    """
    cfg = model.config
    parts = _part_modules(model)
    tokens = batch_size * seq_len
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    keys_attended = batch_size * seq_len * (seq_len + 1) // 2
    attn_proj = sum(_linear_flops_per_token(m) for _, m in parts["attention"]) * tokens
    attn_scores = len(parts["attention"]) * 2 * 2 * heads * head_dim * keys_attended
    ffn = sum(_linear_flops_per_token(m) for _, m in parts["ffn"]) * tokens
    head = model.get_output_embeddings()
    lm_head = 2 * head.in_features * head.out_features * batch_size if head is not None else 0
    return {
        "attention_flops": attn_proj + attn_scores,
        "ffn_flops": ffn,
        "lm_head_flops": lm_head,
        "total_flops": attn_proj + attn_scores + ffn + lm_head,
        "attention_weight_bytes": sum(_param_bytes(m) for _, m in parts["attention"]),
        "ffn_weight_bytes": sum(_param_bytes(m) for _, m in parts["ffn"]),
        "total_weight_bytes": _param_bytes(model),
    }


def amdahl_bound(ffn_fraction: float, ffn_flop_ratio: float) -> float:
    """Upper bound on speedup when only the FFN part (time fraction f) shrinks to `ffn_flop_ratio` of its work."""
    return 1.0 / ((1.0 - ffn_fraction) + ffn_fraction * ffn_flop_ratio)


# ---------------------------------------------------------------------------------------------------- timing


class _Timer:
    """Elapsed milliseconds of a block: CUDA events on GPU, wall clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1000.0


class _PeakMemory:
    """Peak memory during a block, over the memory in use when it began (bytes)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            import psutil

            self.proc = psutil.Process(os.getpid())
            self.base = self.peak = self.proc.memory_info().rss
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.bytes = self.peak - self.base


def _stats(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


@torch.inference_mode()
def _prefill(model, ids):
    """The forward TTFT times: fills the cache and returns logits [B, 1, V] of the last position only. The first
    token needs no other logits, and a full [B, S, V] LM head output would add S× the head's work and memory."""
    return model(input_ids=ids, use_cache=True, logits_to_keep=1)


@torch.inference_mode()
def _decode(model, prefill_out, new_tokens: int, timer_device) -> list[float]:
    """Greedy cached decoding; returns the time of each single-token step (ms)."""
    past = prefill_out.past_key_values
    token = prefill_out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(new_tokens):
        with _Timer(timer_device) as t:
            out = model(input_ids=token, past_key_values=past, use_cache=True)
        past = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        times.append(t.ms)
    return times


@torch.inference_mode()
def module_breakdown(model, ids, repeats: int = 1) -> dict:
    """Per-part time of the prefill forward TTFT times (ms, mean over `repeats`), attributed by module via
    torch.profiler."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    parts = _part_modules(model)
    handles = []

    def wrap(module, label):
        ranges = []

        def pre(mod, args, kwargs=None):
            ranges.append(record_function(label))
            ranges[-1].__enter__()

        def post(mod, args, output, kwargs=None):
            ranges.pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    for part, modules in parts.items():
        for _, module in modules:
            wrap(module, f"sparsekd::{part}")
    cuda = ids.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:
        with profile(activities=activities) as prof:
            for _ in range(repeats):
                with record_function("sparsekd::forward"):
                    _prefill(model, ids)
                if cuda:
                    torch.cuda.synchronize()
    finally:
        for h in handles:
            h.remove()
    totals = {}
    for event in prof.key_averages():
        if event.key.startswith("sparsekd::"):
            us = event.device_time_total if cuda else event.cpu_time_total
            totals[event.key.removeprefix("sparsekd::")] = totals.get(event.key.removeprefix("sparsekd::"), 0.0) + us
    total = totals.get("forward", 0.0) / repeats / 1000.0
    attention = totals.get("attention", 0.0) / repeats / 1000.0
    ffn = totals.get("ffn", 0.0) / repeats / 1000.0
    return {
        "forward_ms": total,
        "attention_ms": attention,
        "ffn_ms": ffn,
        "other_ms": total - attention - ffn,
        "attention_fraction": attention / total if total else 0.0,
        "ffn_fraction": ffn / total if total else 0.0,
        "other_fraction": (total - attention - ffn) / total if total else 0.0,
    }


def profile_model(name: str, model, settings: ProfileConfig, model_index: int, progress=None) -> list[dict]:
    """Profile one loaded model at every (batch, seq_len) cell; one result dict per cell (no speedups yet).

    ``model_index``: this model's position among the models profiled side by side (the first is the baseline);
    stored in every row because names may repeat (the same model profiled twice).
    """
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    results = []
    for seq_len in settings.seq_len:
        for batch in settings.batch_sizes:
            g = torch.Generator().manual_seed(settings.seed)
            ids = torch.randint(0, vocab, (batch, seq_len), generator=g).to(device)
            for _ in range(settings.warmup):
                out = _prefill(model, ids)
                _decode(model, out, min(2, settings.new_tokens), device)
            ttft, tpot = [], []
            with _PeakMemory(device) as mem:
                for _ in range(settings.repeats):
                    with _Timer(device) as t:
                        out = _prefill(model, ids)
                    ttft.append(t.ms)
                    steps = _decode(model, out, settings.new_tokens, device)
                    tpot.append(statistics.mean(steps) if steps else float("nan"))
                    del out
            breakdown = module_breakdown(model, ids)
            flops = flop_accounting(model, batch, seq_len)
            ttft_med, ttft_min, ttft_max = _stats(ttft)
            tpot_med, tpot_min, tpot_max = _stats(tpot)
            results.append({
                "model": name,
                "model_index": model_index,
                "batch_size": batch,
                "seq_len": seq_len,
                "new_tokens": settings.new_tokens,
                "ttft_ms": ttft_med, "ttft_ms_min": ttft_min, "ttft_ms_max": ttft_max,
                "tpot_ms": tpot_med, "tpot_ms_min": tpot_min, "tpot_ms_max": tpot_max,
                "tokens_per_s": batch * seq_len / (ttft_med / 1000.0),  # prefill throughput
                "decode_tokens_per_s": batch / (tpot_med / 1000.0),
                "peak_mem_bytes": int(mem.bytes),
                **{k: breakdown[k] for k in ("attention_ms", "ffn_ms", "other_ms", "forward_ms",
                                              "attention_fraction", "ffn_fraction", "other_fraction")},
                **flops,
                "device": device.type,
                "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                "repeats": settings.repeats,
            })
            if progress is not None:
                progress(results[-1])
    return results


def add_speedups(results: list[dict]) -> list[dict]:
    """Speedup of each cell vs the first model's cell at the same (batch, seq_len), the Amdahl bound from the
    first model's FFN time fraction and this model's FFN FLOP ratio, and efficiency = speedup / bound.
    The first model is the one at the first row's ``model_index`` (by position, not name: names may repeat)."""
    base_index = results[0]["model_index"]
    base = {(r["batch_size"], r["seq_len"]): r for r in results if r["model_index"] == base_index}
    for r in results:
        b = base[(r["batch_size"], r["seq_len"])]
        r["speedup"] = b["ttft_ms"] / r["ttft_ms"]
        r["decode_speedup"] = b["tpot_ms"] / r["tpot_ms"]
        r["ffn_flop_ratio"] = r["ffn_flops"] / b["ffn_flops"]
        r["amdahl_bound"] = amdahl_bound(b["ffn_fraction"], r["ffn_flop_ratio"])
        r["efficiency"] = r["speedup"] / r["amdahl_bound"]
    return results


def markdown_table(results: list[dict]) -> str:
    """Table VII/VIII-style summary: latency, throughput, memory, breakdown and speedup vs its bound."""
    head = ("| model | batch | seq | TTFT ms | TPOT ms | tok/s | peak MiB | attn ms | FFN ms | other ms "
            "| FFN FLOP ratio | speedup | Amdahl bound | efficiency |")
    lines = [head, "|" + "|".join(["---"] * 14) + "|"]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {r['seq_len']} | {r['ttft_ms']:.1f} | {r['tpot_ms']:.2f} "
            f"| {r['tokens_per_s']:.0f} | {r['peak_mem_bytes'] / 2**20:.0f} | {r['attention_ms']:.1f} "
            f"| {r['ffn_ms']:.1f} | {r['other_ms']:.1f} | {r['ffn_flop_ratio']:.3f} | {r['speedup']:.3f}× "
            f"| {r['amdahl_bound']:.3f}× | {r['efficiency']:.0%} |"
        )
    return "\n".join(lines) + "\n"


def speedup_plot(results: list[dict], path) -> None:
    """Speedup vs batch size per compressed model, beside its Amdahl bound (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    base_name, base_index = results[0]["model"], results[0]["model_index"]
    names = {r["model_index"]: r["model"] for r in results}  # by position: the same model may be profiled twice
    for index, name in names.items():
        if index == base_index:
            continue
        for seq in sorted({r["seq_len"] for r in results}):
            cells = sorted((r for r in results if r["model_index"] == index and r["seq_len"] == seq),
                           key=lambda r: r["batch_size"])
            xs = [r["batch_size"] for r in cells]
            label = f"#{index} {name} (seq {seq})"
            line, = ax.plot(xs, [r["speedup"] for r in cells], "o-", label=f"{label} measured")
            ax.plot(xs, [r["amdahl_bound"] for r in cells], "--", color=line.get_color(), label=f"{label} Amdahl bound")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"prefill speedup vs {base_name}")
    if ax.get_legend_handles_labels()[0]:  # only compressed models get lines
        ax.legend(fontsize=7)
    fig.tight_layout()
    write_file_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
