"""Profiling on tiny models: every field in every cell, FLOPs by hand, breakdown sums, factored MLP FLOPs."""

from __future__ import annotations

import json

import pytest
import torch

from sparsekd.cli import main
from sparsekd_core.config import ProfileConfig
from sparsekd_core.profile import add_speedups, amdahl_bound, flop_accounting, module_breakdown, profile_model

FIELDS = {"model", "model_index", "batch_size", "seq_len", "ttft_ms", "tpot_ms", "tokens_per_s", "peak_mem_bytes",
          "peak_rss_bytes", "attention_ms", "ffn_ms", "other_ms", "gpu_busy_fraction", "bound", "speedup",
          "amdahl_bound", "efficiency"}


class LowRank(torch.nn.Module):
    """W ≈ B·A as two thin linears (the shape a factored MLP projection has)."""

    def __init__(self, linear: torch.nn.Linear, rank: int):
        super().__init__()
        self.a = torch.nn.Linear(linear.in_features, rank, bias=False)
        self.b = torch.nn.Linear(rank, linear.out_features, bias=False)

    def forward(self, x):
        return self.b(self.a(x))


def factor(model, rank: int):
    for layer in model.model.layers:
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(layer.mlp, name, LowRank(getattr(layer.mlp, name), rank))
    return model


def test_flops_match_a_hand_count(tiny_llama):
    cfg = tiny_llama.config  # hidden 32, MLP 64, 4 heads of 8, 2 KV heads, 2 layers
    b, s, h, i, layers = 3, 10, 32, 64, 2
    kv = 2 * 8
    tokens = b * s
    attn_proj = layers * tokens * 2 * (h * h + h * kv + h * kv + h * h)
    attn_scores = layers * 2 * 2 * 4 * 8 * (b * s * (s + 1) // 2)
    ffn = layers * tokens * 2 * 3 * h * i
    head = b * 2 * h * cfg.vocab_size  # logits of the last position only
    f = flop_accounting(tiny_llama, b, s)
    assert f["attention_flops"] == attn_proj + attn_scores
    assert f["ffn_flops"] == ffn
    assert f["lm_head_flops"] == head
    assert f["total_flops"] == attn_proj + attn_scores + ffn + head
    assert f["ffn_weight_bytes"] == layers * 3 * h * i * 4


def test_factored_model_has_fewer_mlp_flops(tiny_tokenizer):
    from conftest import make_model

    dense = make_model("llama", len(tiny_tokenizer))
    low = factor(make_model("llama", len(tiny_tokenizer)), rank=8)
    fd, fl = flop_accounting(dense, 1, 16), flop_accounting(low, 1, 16)
    assert fl["ffn_flops"] == 2 * 16 * 2 * 3 * (8 * (32 + 64))  # layers·tokens·2·3 projections·r(in+out)
    assert fl["ffn_flops"] < fd["ffn_flops"] and fl["attention_flops"] == fd["attention_flops"]


def test_breakdown_parts_sum_to_total(tiny_llama):
    ids = torch.randint(0, tiny_llama.config.vocab_size, (2, 32))
    br = module_breakdown(tiny_llama, ids, repeats=2)
    assert br["attention_ms"] > 0 and br["ffn_ms"] > 0 and br["forward_ms"] > 0
    assert br["attention_ms"] + br["ffn_ms"] <= br["forward_ms"] * 1.001
    assert br["attention_fraction"] + br["ffn_fraction"] + br["other_fraction"] == pytest.approx(1.0)


def test_breakdown_uses_ttft_clock_not_torch_profiler(tiny_llama, monkeypatch):
    """The FFN fraction that feeds the Amdahl bound is timed by the hooks on TTFT's clock, not by torch.profiler."""
    import torch.profiler

    def no_profiler(*args, **kwargs):
        raise AssertionError("module_breakdown must not use torch.profiler")

    monkeypatch.setattr(torch.profiler, "profile", no_profiler)
    ids = torch.randint(0, tiny_llama.config.vocab_size, (1, 16))
    assert module_breakdown(tiny_llama, ids)["ffn_fraction"] > 0


def test_peak_memory_counts_weights_and_grows_with_batch(tiny_tokenizer):
    """peak_mem_bytes = weights + the peak tensors of one prefill + decode: exact allocator counts, so the same
    cell gives the same bytes every time, and a bigger batch (activations, KV cache, logits) gives more."""
    from conftest import make_model

    model = make_model("llama", len(tiny_tokenizer))
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    cfg = ProfileConfig(batch_sizes=[1, 8], seq_len=[32], new_tokens=3, warmup=0, repeats=1)
    small, big = profile_model("tiny", model, cfg, 0)
    again = profile_model("tiny", model, cfg.model_copy(update={"batch_sizes": [1]}), 0)[0]
    assert small["peak_mem_bytes"] > weights and big["peak_mem_bytes"] > small["peak_mem_bytes"]
    assert again["peak_mem_bytes"] == small["peak_mem_bytes"]
    kv_cache_growth = 2 * 2 * 7 * (32 + 3) * 2 * 8 * 4  # K and V · layers · extra rows · positions · kv dims · fp32
    assert big["peak_mem_bytes"] - small["peak_mem_bytes"] >= kv_cache_growth


def test_amdahl_bound():
    assert amdahl_bound(0.0, 0.5) == 1.0
    assert amdahl_bound(1.0, 0.5) == pytest.approx(2.0)
    assert amdahl_bound(0.5, 0.5) == pytest.approx(1 / 0.75)


def test_every_field_in_every_cell(tiny_tokenizer):
    from conftest import make_model

    cfg = ProfileConfig(batch_sizes=[1, 2], seq_len=[8, 12], new_tokens=2, warmup=0, repeats=1)
    dense = make_model("llama", len(tiny_tokenizer))
    low = factor(make_model("llama", len(tiny_tokenizer)), rank=4)
    results = add_speedups(profile_model("dense", dense, cfg, 0) + profile_model("low", low, cfg, 1))
    assert len(results) == 2 * 2 * 2
    for r in results:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["ttft_ms"] > 0 and r["tpot_ms"] > 0 and r["peak_mem_bytes"] > r["total_weight_bytes"]
        assert r["peak_rss_bytes"] >= r["peak_mem_bytes"]
        assert r["gpu_busy_fraction"] is None and r["bound"] is None  # CPU: no launch queue to measure
    for r in results[:4]:
        assert r["speedup"] == 1.0 and r["amdahl_bound"] == 1.0
    for r in results[4:]:
        assert r["ffn_flop_ratio"] < 1 and r["amdahl_bound"] > 1


def test_prefill_computes_last_position_logits_only(tiny_tokenizer):
    """Every prefill forward (warmup, timed, breakdown) asks for logits_to_keep=1 and gets [B, 1, V]; the greedy
    tokens fed to the decode steps are those of a full-logits prefill."""
    from conftest import make_model

    model = make_model("llama", len(tiny_tokenizer))
    cfg = ProfileConfig(batch_sizes=[2], seq_len=[8], new_tokens=3, warmup=1, repeats=2)
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(cfg.seed))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        expected = []
        for _ in range(cfg.new_tokens):
            expected.append(out.logits[:, -1:].argmax(-1))
            out = model(input_ids=expected[-1], past_key_values=out.past_key_values, use_cache=True)
    calls = []
    handle = model.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append((kwargs["input_ids"], kwargs.get("logits_to_keep"),
                                                     out.logits.shape)), with_kwargs=True)
    try:
        profile_model("tiny", model, cfg, 0)
    finally:
        handle.remove()
    prefills = [c for c in calls if c[0].shape[1] == 8]
    assert len(prefills) == cfg.warmup + cfg.repeats + 2  # + the memory run's and the breakdown's forwards
    assert all(keep == 1 and shape == (2, 1, model.config.vocab_size) for _, keep, shape in prefills)
    decoded = [c[0] for c in calls if c[0].shape[1] == 1][-cfg.new_tokens:]  # the memory run's (= every run's)
    assert all(torch.equal(a, b) for a, b in zip(decoded, expected, strict=True))


def fake_cell(index: int, ttft: float, tpot: float, ffn_flops: int, ffn_fraction: float) -> dict:
    return {"model": "same/model", "model_index": index, "batch_size": 1, "seq_len": 8, "ttft_ms": ttft,
            "tpot_ms": tpot, "ffn_flops": ffn_flops, "ffn_fraction": ffn_fraction}


def test_baseline_is_the_first_model_by_position_not_by_name(tmp_path, monkeypatch):
    import matplotlib.figure

    from sparsekd_core.profile import speedup_plot

    results = add_speedups([fake_cell(0, 10.0, 2.0, 100, 0.5), fake_cell(1, 5.0, 1.0, 50, 0.4)])
    first, second = results
    assert first["speedup"] == 1.0 and first["decode_speedup"] == 1.0 and first["amdahl_bound"] == 1.0
    assert second["speedup"] == 2.0 and second["decode_speedup"] == 2.0 and second["ffn_flop_ratio"] == 0.5
    assert second["amdahl_bound"] == pytest.approx(amdahl_bound(0.5, 0.5))  # the first model's FFN fraction
    figures, real_savefig = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: figures.append(fig) or real_savefig(fig, *a, **k))
    speedup_plot(results, tmp_path / "speedup.png")
    assert (tmp_path / "speedup.png").read_bytes().startswith(b"\x89PNG")
    labels = [line.get_label() for line in figures[0].axes[0].get_lines()]
    assert [label for label in labels if "#1" in label] == ["#1 same/model (seq 8) measured",
                                                            "#1 same/model (seq 8) Amdahl bound"]
    assert not any("#0" in label for label in labels)


def test_profile_cli_json(capsys, tiny_model_dir, tmp_path):
    capsys.readouterr()
    code = main(["profile", "--model", str(tiny_model_dir), "--model", str(tiny_model_dir), "--batch-sizes", "1,2",
                 "--seq-len", "8", "--new-tokens", "2", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path / "p"),
                 "--json"])
    out, _ = capsys.readouterr()
    assert code == 0
    results = json.loads(out.strip().splitlines()[-1])["results"]
    assert [(r["model"] == str(tiny_model_dir), r["batch_size"]) for r in results] == [(True, 1), (True, 2)] * 2
    assert [r["model_index"] for r in results] == [0, 0, 1, 1]
    assert all(r["speedup"] == 1.0 for r in results[:2])  # the first --model alone is the baseline
    assert (tmp_path / "p" / "profile.md").read_text().startswith("| model |")
    assert (tmp_path / "p" / "speedup.png").stat().st_size > 1000


def test_profile_cli_bad_input(capsys, tiny_model_dir):
    capsys.readouterr()
    assert main(["profile", "--model", str(tiny_model_dir), "--batch-sizes", "1,x"]) == 2
    assert main(["profile", "--model", str(tiny_model_dir), "--batch-sizes", "0"]) == 2
    _, err = capsys.readouterr()
    assert "--batch-sizes takes comma-separated integers" in err and "profile.batch_sizes" in err


def table_row(index: int, batch: int, speedup: float, ffn_flop_ratio: float, bound: str | None) -> dict:
    """A full result row (what profile_model + add_speedups give) with only the fields the note reads varied."""
    return {"model": "dense" if index == 0 else "svd", "model_index": index, "batch_size": batch, "seq_len": 64,
            "ttft_ms": 5.0, "tpot_ms": 1.0, "tokens_per_s": 1000.0, "peak_mem_bytes": 600 * 2**20,
            "peak_rss_bytes": 2**30, "attention_ms": 2.0, "ffn_ms": 2.0, "other_ms": 1.0,
            "gpu_busy_fraction": None if bound is None else (0.3 if bound == "launch" else 0.9), "bound": bound,
            "ffn_flop_ratio": ffn_flop_ratio, "speedup": speedup, "amdahl_bound": 1.2, "efficiency": speedup / 1.2}


def test_table_notes_launch_bound_slowdowns():
    from sparsekd_core.profile import markdown_table

    rows = [table_row(0, 1, 1.0, 1.0, "launch"), table_row(0, 64, 1.0, 1.0, "compute"),
            table_row(1, 1, 0.8, 0.5, "launch"), table_row(1, 64, 1.15, 0.5, "compute")]
    table = markdown_table(rows)
    lines = table.splitlines()
    assert lines[0].startswith("| model |") and len(lines[0].split("|")) == len(lines[1].split("|"))
    assert "| 600 | 1024 |" in lines[2] and "| launch (30% busy) |" in lines[2]
    note = lines[-1]
    assert "#1 svd at batch 1, seq 64 (0.80×, FFN FLOPs 0.50× the baseline's, launch-bound)" in note
    assert "batch 64" not in note and "launch-bound" in note and "two GEMMs" in note


def test_table_has_no_note_when_compression_pays_and_cpu_rows_render():
    from sparsekd_core.profile import markdown_table

    table = markdown_table([table_row(0, 1, 1.0, 1.0, None), table_row(1, 1, 1.1, 0.5, None)])
    assert "Slower" not in table and table.count("\n") == 4  # header, rule, two rows
    assert "| – |" in table  # no launch verdict on CPU
    cpu_slow = markdown_table([table_row(0, 1, 1.0, 1.0, None), table_row(1, 1, 0.9, 0.5, None)])
    assert "#1 svd at batch 1, seq 64 (0.90×" in cpu_slow and "launch-bound" not in cpu_slow
