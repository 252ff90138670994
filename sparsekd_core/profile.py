"""Inference profiling: TTFT/TPOT, memory, where the time goes (attention vs FFN), FLOPs and the Amdahl bound.

Timing. Prefill latency (TTFT) is one forward over ``[batch, seq_len]`` random token ids that returns the first
new token's logits (the last position's only, ``logits_to_keep=1``, as ``generate`` does); decode latency (TPOT)
is the mean time of one cached single-token step over ``new_tokens`` greedy steps. Each is measured after
``warmup`` untimed runs, ``repeats`` times, and reported as median / min / max. Clock: CUDA events around the work
(synchronised before and after) on GPU; ``time.perf_counter`` on CPU.

Breakdown (attention / FFN / other time of a prefill forward) uses the *same clock as TTFT*, so the FFN time
fraction that feeds the Amdahl bound and the measured speedup are comparable: forward pre/post hooks record a CUDA
event (GPU) or read ``time.perf_counter`` (CPU) around every attention module and every MLP module of every decoder
layer, and around the whole prefill forward; on GPU the events are read once after one synchronise at the end.
``other = forward - attention - ffn`` (embeddings, norms, LM head, glue). Attribution is by module, never by kernel
name. This is a separate forward from the timed ones (the hooks cost a little time of their own).

Launch-bound or compute-bound (``gpu_busy_fraction``, ``bound``). CUDA: the union of the device-side intervals of
every kernel/memcpy/memset of one prefill, from ``torch.profiler``, over that cell's median TTFT (the profiler
slows the CPU side, so the un-profiled TTFT is the honest denominator; kernel durations are measured on the device
and barely change). Below 0.5 the GPU sits idle waiting for the CPU to launch work: ``bound = "launch"``, where
fewer FLOPs need not mean less time; otherwise ``"compute"``. CPU: both are ``None`` (ops run synchronously on
the calling threads; there is no launch queue to starve).

Memory. ``peak_mem_bytes`` means the same on both devices: the model's parameter + buffer bytes plus the peak of
tensor bytes allocated (and still live) during one untimed prefill + ``new_tokens`` decode steps: activations, the
KV cache, logits. CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was
allocated when the run began. CPU: every allocation and free of the CPU allocator during the run, as recorded by
``torch.profiler(profile_memory=True)`` (its raw ``[memory]`` events, signed bytes, in time order): the maximum of
their running sum. Both count live tensor allocations, not the allocators' cached free memory (CUDA's counts
round each block up to 512 bytes).
``peak_rss_bytes``: the whole process's resident high-water mark during the cell (every run of it;
host memory, so on CUDA the host side only): the kernel's ``VmHWM`` after resetting it through
``/proc/self/clear_refs``, or, where that file is not writable, the peak of a 2 ms RSS sampler (can miss spikes
shorter than that). It includes Python, torch and everything else the process holds.

FLOPs (analytic, per forward, multiply-add = 2 FLOPs): every ``nn.Linear`` inside an attention or MLP module
counts ``2·in·out`` per token (so a factored MLP counts its two thin linears), plus attention's score and value
products ``2·2·heads·head_dim·(keys attended)`` per token (causal: query i attends to i+1 keys in prefill),
plus the LM head (on the last position only). Weight bytes = the bytes of the parameters of each part.

Amdahl bound on prefill speedup for a compressed model, from the *dense* (first) model's breakdown:
``bound = 1 / ((1 - f_ffn) + f_ffn · flops_ffn_compressed / flops_ffn_dense)`` with ``f_ffn`` the dense FFN time
fraction; ``efficiency = measured speedup / bound`` (the paper: 1.17× of a 1.29× bound = 90%). The bound counts
FLOPs only, so it does not hold for launch-bound cells.
"""

from __future__ import annotations

import gc
import os
import statistics
import threading
import time
import torch

from .config import ProfileConfig
from .files import write_file_atomic

ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")
LAUNCH_BOUND_BELOW = 0.5  # gpu_busy_fraction under which a cell is launch-bound


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


def _marker(cuda: bool):
    """A point on TTFT's clock: a recorded CUDA event on GPU, ``time.perf_counter()`` seconds on CPU."""
    if cuda:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _elapsed_ms(start, end) -> float:
    """Milliseconds between two markers (for CUDA events, after a synchronise)."""
    if isinstance(start, float):
        return (end - start) * 1000.0
    return start.elapsed_time(end)


class _Timer:
    """Elapsed milliseconds of a block: CUDA events on GPU, wall clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
        self.start = _marker(self.cuda)
        return self

    def __exit__(self, *exc):
        end = _marker(self.cuda)
        if self.cuda:
            torch.cuda.synchronize()
        self.ms = _elapsed_ms(self.start, end)


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
    """Per-part time of the prefill forward TTFT times (ms, mean over `repeats`), on TTFT's clock: forward hooks
    mark the start and end of every attention and MLP module call, and the whole forward is marked too."""
    parts = _part_modules(model)
    cuda = ids.device.type == "cuda"
    spans: dict[str, list[tuple]] = {"forward": [], "attention": [], "ffn": []}  # (start, end) markers
    handles = []

    def hook(module, part):
        starts = []  # a stack: the same module object may be called again before it returns

        def pre(mod, args):
            starts.append(_marker(cuda))

        def post(mod, args, output):
            spans[part].append((starts.pop(), _marker(cuda)))

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    for part, modules in parts.items():
        for _, module in modules:
            hook(module, part)
    try:
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
            start = _marker(cuda)
            _prefill(model, ids)
            spans["forward"].append((start, _marker(cuda)))
        if cuda:
            torch.cuda.synchronize()  # once: every event has completed, elapsed_time may read them
    finally:
        for h in handles:
            h.remove()
    ms = {part: sum(_elapsed_ms(a, b) for a, b in pairs) / repeats for part, pairs in spans.items()}
    total, attention, ffn = ms["forward"], ms["attention"], ms["ffn"]
    return {
        "forward_ms": total,
        "attention_ms": attention,
        "ffn_ms": ffn,
        "other_ms": total - attention - ffn,
        "attention_fraction": attention / total if total else 0.0,
        "ffn_fraction": ffn / total if total else 0.0,
        "other_fraction": (total - attention - ffn) / total if total else 0.0,
    }


@torch.inference_mode()
def _device_busy_ms(model, ids) -> float:
    """Milliseconds the GPU is busy during one prefill: the union of the device-side intervals of its kernels,
    copies and memsets, from torch.profiler (overlapping streams counted once)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _prefill(model, ids)
        torch.cuda.synchronize()
    intervals = sorted(
        (e.start_ns(), e.end_ns()) for e in prof.profiler.kineto_results.events()
        if e.device_type() == DeviceType.CUDA and not getattr(e, "is_user_annotation", lambda: False)()
    )
    busy_ns, covered_to = 0, None
    for start, end in intervals:
        if covered_to is None or start > covered_to:
            busy_ns += end - start
            covered_to = end
        elif end > covered_to:
            busy_ns += end - covered_to
            covered_to = end
    return busy_ns / 1e6


# ---------------------------------------------------------------------------------------------------- memory


def _tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (tied weights counted once)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


@torch.inference_mode()
def _generate_untimed(model, ids, new_tokens: int) -> None:
    out = _prefill(model, ids)
    _decode(model, out, new_tokens, ids.device)


def _cpu_allocation_peak(model, ids, new_tokens: int) -> int:
    """Peak of CPU tensor bytes allocated and still live during one prefill + decode run, over those live when it
    began: the running sum of torch.profiler's raw memory events (signed bytes: + allocation, - free) in time order.
    Exact, unlike RSS, which misses memory the C allocator reuses and counts memory it has not returned."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _generate_untimed(model, ids, new_tokens)
    cpu_kinds = (DeviceType.CPU, DeviceType.MKLDNN, DeviceType.IDEEP)
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() in cpu_kinds), key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def peak_tensor_bytes(model, ids, new_tokens: int) -> int:
    """The model's parameter + buffer bytes plus the peak of the tensor bytes one prefill of ``ids`` and
    ``new_tokens`` greedy decode steps allocate (activations, KV cache, logits); exact on CPU and CUDA."""
    gc.collect()  # leftovers of earlier runs freed now, not inside the measured run
    if ids.device.type == "cuda":
        torch.cuda.synchronize(ids.device)
        before = torch.cuda.memory_allocated(ids.device)
        torch.cuda.reset_peak_memory_stats(ids.device)
        _generate_untimed(model, ids, new_tokens)
        torch.cuda.synchronize(ids.device)
        extra = torch.cuda.max_memory_allocated(ids.device) - before
    else:
        extra = _cpu_allocation_peak(model, ids, new_tokens)
    return _tensor_bytes(model) + extra


class _PeakRss:
    """The process's resident-set high-water mark during a block (bytes): Linux's VmHWM, reset on entry by
    writing 5 to /proc/self/clear_refs; where that is not possible, the peak of a 2 ms RSS sampler thread."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.sampler = None
        except OSError:
            import psutil

            self.proc = psutil.Process(os.getpid())
            self.peak = self.proc.memory_info().rss
            self.stop = threading.Event()
            self.sampler = threading.Thread(target=self._sample, daemon=True)
            self.sampler.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        if self.sampler is None:
            with open("/proc/self/status") as f:
                hwm_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
            self.bytes = hwm_kib * 1024
        else:
            self.stop.set()
            self.sampler.join()
            self.bytes = max(self.peak, self.proc.memory_info().rss)


# ---------------------------------------------------------------------------------------------------- cells


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
            with _PeakRss() as rss:
                for _ in range(settings.warmup):
                    _generate_untimed(model, ids, min(2, settings.new_tokens))
                ttft, tpot = [], []
                for _ in range(settings.repeats):
                    with _Timer(device) as t:
                        out = _prefill(model, ids)
                    ttft.append(t.ms)
                    steps = _decode(model, out, settings.new_tokens, device)
                    tpot.append(statistics.mean(steps) if steps else float("nan"))
                    del out
                peak_mem = peak_tensor_bytes(model, ids, settings.new_tokens)
                breakdown = module_breakdown(model, ids)
                busy_ms = _device_busy_ms(model, ids) if device.type == "cuda" else None
            flops = flop_accounting(model, batch, seq_len)
            ttft_med, ttft_min, ttft_max = _stats(ttft)
            tpot_med, tpot_min, tpot_max = _stats(tpot)
            busy = min(1.0, busy_ms / ttft_med) if busy_ms is not None else None
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
                "peak_mem_bytes": int(peak_mem),
                "peak_rss_bytes": int(rss.bytes),
                **{k: breakdown[k] for k in ("attention_ms", "ffn_ms", "other_ms", "forward_ms",
                                              "attention_fraction", "ffn_fraction", "other_fraction")},
                "gpu_busy_fraction": busy,
                "bound": None if busy is None else ("launch" if busy < LAUNCH_BOUND_BELOW else "compute"),
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


def _mib(nbytes) -> str:
    return "–" if nbytes is None else f"{nbytes / 2**20:.0f}"


def _bound_cell(r: dict) -> str:
    busy = r.get("gpu_busy_fraction")
    return "–" if busy is None else f"{r['bound']} ({busy:.0%} busy)"


def slower_despite_fewer_flops(results: list[dict]) -> list[dict]:
    """Cells of a compressed model slower than the baseline (speedup < 1) although its FFN does fewer FLOPs."""
    return [r for r in results if r["speedup"] < 1 and r["ffn_flop_ratio"] < 1]


def slowdown_note(results: list[dict]) -> str | None:
    """One line for under the table naming the cells `slower_despite_fewer_flops` finds and why; None if none."""
    cells = slower_despite_fewer_flops(results)
    if not cells:
        return None
    listed = "; ".join(f"#{r['model_index']} {r['model']} at batch {r['batch_size']}, seq {r['seq_len']} "
                       f"({r['speedup']:.2f}×, FFN FLOPs {r['ffn_flop_ratio']:.2f}× the baseline's"
                       f"{', launch-bound' if r.get('bound') == 'launch' else ''})" for r in cells)
    if any(r.get("bound") == "launch" for r in cells):
        why = ("At small batch on a big GPU the prefill is launch-bound: the GPU waits on the CPU to launch kernels, "
               "not on arithmetic, and a factored MLP launches two GEMMs per projection where the dense one launches "
               "one, so the SVD model can be slower than the dense one there; its Amdahl bound (FLOPs only) does not "
               "apply.")
    else:
        why = ("Fewer FLOPs need not mean less time when the work is small: a factored MLP runs two thin GEMMs per "
               "projection, each with its own fixed cost, where the dense one runs one.")
    return f"**Slower than the baseline despite fewer FFN FLOPs:** {listed}. {why}"


def markdown_table(results: list[dict]) -> str:
    """Table VII/VIII-style summary: latency, throughput, memory, breakdown, launch-bound verdict and speedup vs its
    bound; a note under it for compressed cells slower than the baseline (`slowdown_note`).

    ``peak MiB`` is ``peak_mem_bytes`` (weights + peak tensors of one prefill + decode), ``RSS MiB`` is
    ``peak_rss_bytes`` (the process's resident high-water mark), ``bound`` is ``bound`` with
    ``gpu_busy_fraction`` ("–" on CPU)."""
    head = ("| model | batch | seq | TTFT ms | TPOT ms | tok/s | peak MiB | RSS MiB | attn ms | FFN ms | other ms "
            "| bound | FFN FLOP ratio | speedup | Amdahl bound | efficiency |")
    lines = [head, "|" + "|".join(["---"] * 16) + "|"]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {r['seq_len']} | {r['ttft_ms']:.1f} | {r['tpot_ms']:.2f} "
            f"| {r['tokens_per_s']:.0f} | {_mib(r['peak_mem_bytes'])} | {_mib(r.get('peak_rss_bytes'))} "
            f"| {r['attention_ms']:.1f} | {r['ffn_ms']:.1f} | {r['other_ms']:.1f} | {_bound_cell(r)} "
            f"| {r['ffn_flop_ratio']:.3f} | {r['speedup']:.3f}× | {r['amdahl_bound']:.3f}× | {r['efficiency']:.0%} |"
        )
    note = slowdown_note(results)
    return "\n".join(lines) + "\n" + (f"\n{note}\n" if note else "")


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
