"""Profiling on tiny models: every field in every cell, FLOPs by hand, breakdown sums, factored MLP FLOPs."""

from __future__ import annotations

import json

import pytest
import torch

from sparsekd.cli import main
from sparsekd_core.config import ProfileConfig
from sparsekd_core.profile import add_speedups, amdahl_bound, flop_accounting, module_breakdown, profile_model

FIELDS = {"model", "batch_size", "seq_len", "ttft_ms", "tpot_ms", "tokens_per_s", "peak_mem_bytes", "attention_ms",
          "ffn_ms", "other_ms", "speedup", "amdahl_bound", "efficiency"}


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
    head = tokens * 2 * h * cfg.vocab_size
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


def test_amdahl_bound():
    assert amdahl_bound(0.0, 0.5) == 1.0
    assert amdahl_bound(1.0, 0.5) == pytest.approx(2.0)
    assert amdahl_bound(0.5, 0.5) == pytest.approx(1 / 0.75)


def test_every_field_in_every_cell(tiny_tokenizer):
    from conftest import make_model

    cfg = ProfileConfig(batch_sizes=[1, 2], seq_len=[8, 12], new_tokens=2, warmup=0, repeats=1)
    dense = make_model("llama", len(tiny_tokenizer))
    low = factor(make_model("llama", len(tiny_tokenizer)), rank=4)
    results = add_speedups(profile_model("dense", dense, cfg) + profile_model("low", low, cfg))
    assert len(results) == 2 * 2 * 2
    for r in results:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["ttft_ms"] > 0 and r["tpot_ms"] > 0 and r["peak_mem_bytes"] >= 0
    for r in results[:4]:
        assert r["speedup"] == 1.0 and r["amdahl_bound"] == 1.0
    for r in results[4:]:
        assert r["ffn_flop_ratio"] < 1 and r["amdahl_bound"] > 1


def test_profile_cli_json(capsys, tiny_model_dir, tmp_path):
    capsys.readouterr()
    code = main(["profile", "--model", str(tiny_model_dir), "--model", str(tiny_model_dir), "--batch-sizes", "1,2",
                 "--seq-len", "8", "--new-tokens", "2", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path / "p"),
                 "--json"])
    out, _ = capsys.readouterr()
    assert code == 0
    results = json.loads(out.strip().splitlines()[-1])["results"]
    assert [(r["model"] == str(tiny_model_dir), r["batch_size"]) for r in results] == [(True, 1), (True, 2)] * 2
    assert (tmp_path / "p" / "profile.md").read_text().startswith("| model |")
    assert (tmp_path / "p" / "speedup.png").stat().st_size > 1000


def test_profile_cli_bad_input(capsys, tiny_model_dir):
    capsys.readouterr()
    assert main(["profile", "--model", str(tiny_model_dir), "--batch-sizes", "1,x"]) == 2
    assert main(["profile", "--model", str(tiny_model_dir), "--batch-sizes", "0"]) == 2
    _, err = capsys.readouterr()
    assert "--batch-sizes takes comma-separated integers" in err and "profile.batch_sizes" in err
