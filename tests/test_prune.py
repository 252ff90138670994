"""Pruning: low-rank layers, rank selection, re-truncation, WANDA, compressed checkpoints, the `prune` verb."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from conftest import make_model
from sparsekd_core.config import ConfigError, ModelConfig, PruneConfig, build
from sparsekd_core.models import load_model
from sparsekd_core.prune import LowRankLinear, count_params, find_mlp_matrices, prune_model, save_compressed, save_dense
from sparsekd_core.prune.calibration import input_statistics
from sparsekd_core.prune.svd import TOLERANCE, spectrum, truncated_layer, whitening_factor

LOGITS_ATOL = 1e-4  # fp32 logits of a tiny model: factored vs dense forward differ only by matmul rounding

CALIB = dict(calibration_samples=4, calibration_seq_len=32)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread is faster, and avoids OpenMP spin-waits when the 2 cores are shared (~100×)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_arch(kind: str, vocab_size: int, hidden: int = 32, mlp: int = 64, layers: int = 2, seed: int = 0,
              **config):
    """Tiny random models of each MLP family (gate/up/down or fused gate_up); ``config``: more config fields."""
    from transformers import (AutoModelForCausalLM, GemmaConfig, LlamaConfig, MistralConfig, Phi3Config,
                              Qwen2Config, Qwen3Config)

    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig,
           "gemma": GemmaConfig, "phi3": Phi3Config}[kind]
    extra = {"qwen3": dict(head_dim=8), "gemma": dict(head_dim=8), "phi3": dict(pad_token_id=0)}.get(kind, {})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cls(**common, **extra, **config), dtype=torch.float32).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.fixture(scope="module")
def ids(tiny_tokenizer):
    torch.manual_seed(1)
    return torch.randint(0, len(tiny_tokenizer), (2, 24))


@pytest.mark.parametrize("kind,projections", [("llama", 3), ("qwen3", 3), ("mistral", 3), ("gemma", 3),
                                              ("phi3", 2)])
def test_each_architecture_full_rank_reproduces_logits_and_prunes(kind, projections, tiny_tokenizer, ids):
    model = make_arch(kind, len(tiny_tokenizer))
    matrices = find_mlp_matrices(model)
    assert len(matrices) == projections * 2 and all("attn" not in m.name for m in matrices)
    if kind == "phi3":
        assert {m.proj for m in matrices} == {"gate_up_proj", "down_proj"}
    reference = logits(model, ids)
    full = make_arch(kind, len(tiny_tokenizer))
    for m in find_mlp_matrices(full):
        full.get_submodule(m.name.rpartition(".")[0]).__setattr__(m.proj, truncated_layer(m.module, min(m.shape)))
    assert torch.allclose(logits(full, ids), reference, atol=LOGITS_ATOL)
    report = prune_model(model, tiny_tokenizer, PruneConfig(target_reduction=0.3, **CALIB), log=lambda _: None)
    assert abs(report.summary()["mlp_reduction"] - 0.3) <= TOLERANCE
    assert logits(model, ids).shape == reference.shape


def test_whitened_full_rank_is_exact(tiny_tokenizer, ids):
    model = make_model("llama", len(tiny_tokenizer))
    reference = logits(model, ids)
    stats, _ = input_statistics(model, find_mlp_matrices(model), ids)
    for m in find_mlp_matrices(model):
        layer = truncated_layer(m.module, min(m.shape), whitening_factor(stats[m.name], 0.01))
        model.get_submodule(m.name.rpartition(".")[0]).__setattr__(m.proj, layer)
    assert torch.allclose(logits(model, ids), reference, atol=LOGITS_ATOL)


def test_whitened_truncation_reaches_the_optimal_output_error():
    """Below full rank on correlated inputs, whitened truncation attains (up to damping) the best rank-r output
    error ‖(W − W_r) Xᵀ‖_F, which is Eckart–Young on W·Xᵀ; plain SVD (weight error) is far from it."""
    torch.manual_seed(0)
    out_f, in_f, tokens, r = 48, 40, 400, 8
    q_left, _ = torch.linalg.qr(torch.randn(in_f, in_f, dtype=torch.float64))
    q_right, _ = torch.linalg.qr(torch.randn(in_f, in_f, dtype=torch.float64))
    mixing = q_left @ torch.diag(torch.logspace(0, -3, in_f, dtype=torch.float64)) @ q_right  # condition 1e3
    x = torch.randn(tokens, in_f, dtype=torch.float64) @ mixing  # [tokens, in]: strongly correlated columns
    layer = nn.Linear(in_f, out_f, bias=False, dtype=torch.float64)
    weight = layer.weight.detach()

    def output_error(approx: torch.Tensor) -> float:
        return torch.linalg.norm((weight - approx) @ x.T).item()

    optimal = torch.linalg.svdvals(weight @ x.T)[r:].square().sum().sqrt().item()
    whitened = output_error(truncated_layer(layer, r, whitening_factor(x.T @ x, 1e-4)).merged_weight())
    plain = output_error(truncated_layer(layer, r).merged_weight())
    # Damping 1e-4 moves the optimum by ~1e-6 relatively; a wrong whitener (e.g. the Cholesky factor of G² instead
    # of G, or diag(G)^½) lands 2%–300% above it.
    assert whitened <= optimal * (1 + 1e-3)
    assert plain > 2 * optimal and whitened < plain


@pytest.mark.parametrize("schedule", ["uniform", "tiered", "energy"])
@pytest.mark.parametrize("target", [0.15, 0.35, 0.65])
def test_target_reduction_within_half_a_point_and_counts_are_exact(schedule, target, tiny_tokenizer):
    model = make_arch("llama", len(tiny_tokenizer), hidden=48, mlp=128, layers=4)
    cfg = PruneConfig(target_reduction=target, schedule=schedule, calibration=None)
    summary = prune_model(model, tiny_tokenizer, cfg).summary()
    assert abs(summary["mlp_reduction"] - target) <= TOLERANCE
    mlp = sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)
    assert summary["mlp_params_after"] == mlp
    assert summary["total_params_after"] == sum(p.numel() for p in model.parameters())
    assert summary["mlp_params_before"] == 4 * 3 * 48 * 128
    if schedule == "tiered":  # middle blocks are cut harder than edge blocks, gates less than up/down
        ranks = {(r["layer"], r["proj"]): r["rank_after"] or 48 for r in summary["layers"]}
        assert ranks[(0, "up_proj")] >= ranks[(1, "up_proj")] and ranks[(3, "up_proj")] >= ranks[(2, "up_proj")]
        assert ranks[(1, "gate_proj")] >= ranks[(1, "up_proj")]


def test_energy_one_keeps_the_model_unchanged(tiny_tokenizer, ids):
    model = make_model("llama", len(tiny_tokenizer))
    reference = logits(model, ids)
    report = prune_model(model, tiny_tokenizer, PruneConfig(energy=1.0, **CALIB), log=lambda _: None)
    assert all(row.rank_after is None for row in report.layers)
    assert torch.equal(logits(model, ids), reference)
    assert report.summary()["mlp_reduction"] == 0


@pytest.mark.parametrize("whiten", [False, True])
def test_retruncation_equals_direct_truncation_of_the_product(whiten):
    torch.manual_seed(0)
    out_f, in_f, r0, r = 48, 40, 20, 8
    factored = LowRankLinear.from_factors(torch.randn(out_f, r0, dtype=torch.float64),
                                          torch.randn(r0, in_f, dtype=torch.float64), None)
    dense = nn.Linear(in_f, out_f, bias=False, dtype=torch.float64)
    dense.weight.data = factored.merged_weight()
    x = torch.randn(200, in_f, dtype=torch.float64)
    whitener = whitening_factor(x.T @ x, 0.01) if whiten else None
    via_qr = truncated_layer(factored, r, whitener).merged_weight()
    direct = truncated_layer(dense, r, whitener).merged_weight()
    assert torch.allclose(via_qr, direct, atol=1e-9)
    assert torch.allclose(spectrum(factored, whitener)[1][:r0], spectrum(dense, whitener)[1][:r0], atol=1e-9)


def test_two_rounds_retruncate_and_record_history(tiny_tokenizer, ids):
    model = make_arch("llama", len(tiny_tokenizer), hidden=48, mlp=128, layers=4)
    first = prune_model(model, tiny_tokenizer, PruneConfig(target_reduction=0.2, **CALIB), parent="dense")
    ranks_1 = {r.name: r.rank_after for r in first.layers}
    second = prune_model(model, tiny_tokenizer, PruneConfig(target_reduction=0.4, **CALIB), parent="r1")
    assert abs(second.summary()["mlp_reduction"] - 0.4) <= TOLERANCE
    assert all(r.rank_after <= ranks_1[r.name] for r in second.layers if ranks_1[r.name] is not None)
    record = model.config.sparsekd_compression
    assert record["round"] == 2 and [h["parent"] for h in record["history"]] == ["dense", "r1"]
    with pytest.raises(ConfigError, match="already at"):
        prune_model(model, tiny_tokenizer, PruneConfig(target_reduction=0.3, **CALIB))


def test_wanda_sparsity_is_exact_per_matrix(tiny_tokenizer):
    model = make_model("llama", len(tiny_tokenizer))
    attention_before = model.model.layers[0].self_attn.q_proj.weight.clone()
    report = prune_model(model, tiny_tokenizer, PruneConfig(method="wanda", target_reduction=0.5, **CALIB))
    for m in find_mlp_matrices(model):
        w = m.module.weight
        assert int((w == 0).sum()) == w.numel() // 2
        assert ((w == 0).sum(1) == w.shape[1] // 2).all()  # per output row
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, attention_before)
    summary = report.summary()
    assert summary["mlp_params_after"] == summary["mlp_params_before"] // 2
    odd = make_arch("llama", len(tiny_tokenizer), hidden=32, mlp=70)
    prune_model(odd, tiny_tokenizer, PruneConfig(method="wanda", target_reduction=0.37, **CALIB))
    for m in find_mlp_matrices(odd):
        assert int((m.module.weight == 0).sum()) == round(0.37 * m.module.weight.numel())


def test_wanda_2_4_zeros_the_two_lowest_scores_of_every_group_of_four(tiny_tokenizer):
    """pattern=2:4: in every run of 4 consecutive inputs of every row, exactly 2 zeros, and they are the 2 entries
    with the lowest |W|·‖X‖ (checked against a plain loop over the groups), on Llama and on Phi-3's fused
    gate_up_proj; the 2:4 pattern is recorded; other patterns and methods are refused."""
    from sparsekd_core.prune.wanda import wanda_mask_2_4

    torch.manual_seed(0)
    weight, sq_norm = torch.randn(6, 16), torch.rand(16) + 0.1
    mask, _ = wanda_mask_2_4(weight, sq_norm)
    score = weight.abs() * sq_norm.sqrt()
    for row in range(6):
        for group in range(4):
            cols = range(4 * group, 4 * group + 4)
            lowest = sorted(cols, key=lambda c: (float(score[row, c]), c))[:2]
            assert [c for c in cols if mask[row, c]] == sorted(lowest)
    for kind in ("llama", "phi3"):
        model = make_arch(kind, len(tiny_tokenizer))
        report = prune_model(model, tiny_tokenizer, PruneConfig(method="wanda", pattern="2:4", target_reduction=0.5,
                                                                **CALIB))
        for m in find_mlp_matrices(model):
            groups = (m.module.weight == 0).reshape(m.module.weight.shape[0], -1, 4).sum(-1)
            assert (groups == 2).all(), (kind, m.name)
        assert report.summary()["pattern"] == "2:4"
    with pytest.raises(ValueError, match="target_reduction must be 0.5"):
        PruneConfig(method="wanda", pattern="2:4", target_reduction=0.6, **CALIB)
    with pytest.raises(ValueError, match="applies to method=wanda only"):
        PruneConfig(method="svd", pattern="2:4", target_reduction=0.5, **CALIB)


@pytest.mark.parametrize("kind", ["llama", "phi3"])
def test_save_load_identical_and_dense_export_equal(kind, tmp_path, tiny_tokenizer, ids):
    from transformers import AutoModelForCausalLM

    model = make_arch(kind, len(tiny_tokenizer), hidden=48, mlp=128)
    dense_bytes_model = make_arch(kind, len(tiny_tokenizer), hidden=48, mlp=128)
    prune_model(model, tiny_tokenizer, PruneConfig(target_reduction=0.5, **CALIB), parent="tiny")
    expected = logits(model, ids)
    save_compressed(model, tiny_tokenizer, tmp_path / "pruned")
    save_dense(model, tiny_tokenizer, tmp_path / "dense")

    loaded = load_model(ModelConfig(model=str(tmp_path / "pruned"), dtype="fp32", device="cpu"), log=lambda _: None)
    assert torch.equal(logits(loaded.model, ids), expected)
    assert count_params(loaded.model) == count_params(model)
    with safe_open(str(tmp_path / "pruned" / "model.safetensors"), "pt") as f:
        stored = sum(f.get_slice(k).get_shape().numel() if hasattr(f.get_slice(k).get_shape(), "numel")
                     else torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())
    assert stored == count_params(model)["total"]  # file holds exactly the reduced parameter count
    dense_bytes_model.save_pretrained(tmp_path / "orig")
    assert (tmp_path / "pruned" / "model.safetensors").stat().st_size < (tmp_path / "orig" / "model.safetensors").stat().st_size

    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert not any(isinstance(m, LowRankLinear) for m in stock.modules())
    assert torch.allclose(logits(stock, ids), expected, atol=LOGITS_ATOL)

    # Trainable: gradients reach the factors, and the trained model saves and loads again.
    loaded.model.train()
    loaded.model(input_ids=ids, labels=ids).loss.backward()
    factored = [m.module for m in find_mlp_matrices(loaded.model) if isinstance(m.module, LowRankLinear)]
    assert factored and all(m.u.weight.grad is not None and m.v.weight.grad is not None for m in factored)
    save_compressed(loaded.model.eval(), tiny_tokenizer, tmp_path / "pruned")  # overwrite in place
    again = load_model(ModelConfig(model=str(tmp_path / "pruned"), dtype="fp32", device="cpu"), log=lambda _: None)
    assert torch.equal(logits(again.model, ids), expected)
    # A factored model saved the Hugging Face way (as a training loop might) loads the same, sharded or not.
    again.model.save_pretrained(tmp_path / "hf-saved", max_shard_size="20KB")
    tiny_tokenizer.save_pretrained(tmp_path / "hf-saved")
    assert (tmp_path / "hf-saved" / "model.safetensors.index.json").is_file()
    hf = load_model(ModelConfig(model=str(tmp_path / "hf-saved"), dtype="fp32", device="cpu"), log=lambda _: None)
    assert torch.equal(logits(hf.model, ids), expected)


def test_config_errors_are_one_line_and_actionable():
    cases = [
        ({"target_reduction": 0.2, "energy": 0.9}, "exactly one of target_reduction"),
        ({}, "exactly one of target_reduction"),
        ({"target_reduction": 1.5}, "target_reduction=1.5"),
        ({"method": "wanda", "energy": 0.9}, "energy applies to svd only"),
        ({"energy": 0.9, "schedule": "tiered"}, "schedule spreads target_reduction"),
        ({"target_reduction": 0.2, "calibration": "wikitext2:test"}, "evaluation set"),
        ({"target_reduction": 0.2, "whiten": True, "calibration": "none"}, "needs calibration"),
    ]
    for values, expected in cases:
        with pytest.raises(ConfigError, match=expected) as err:
            build(PruneConfig, "prune", values)
        assert "\n" not in str(err.value)


def test_prune_verb_end_to_end(tmp_path, tiny_model_dir, capsys):
    from sparsekd.cli import main

    out = tmp_path / "r1"
    calib = ["--calibration-samples", "4", "--calibration-seq-len", "32"]
    rc = main(["prune", "--model", str(tiny_model_dir), "--target-reduction", "0.3", "--out", str(out), "--json",
               *calib])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("mlp_params_before", "mlp_params_after", "mlp_reduction", "total_params_before",
                "total_params_after", "seconds", "layers"):
        assert key in result
    assert abs(result["mlp_reduction"] - 0.3) <= TOLERANCE and result["method"] == "svd-whitened"
    assert result["saved_total_params"] == result["total_params_after"]
    assert main(["eval", "--model", str(out), "--data", "wikitext2:test", "--max-tokens", "64", "--ctx", "32",
                 "--stride", "16", "--json"]) == 0
    capsys.readouterr()
    rc = main(["prune", "--model", str(out), "--target-reduction", "0.4,0.5", "--schedule", "uniform",
               "--out", str(tmp_path / "r3"), "--dense-out", str(tmp_path / "r3-dense"), *calib])
    assert rc == 0
    human = capsys.readouterr().out
    assert "layers.0.mlp.gate_proj" in human and "reduction 0.5" in human
    assert json.loads((tmp_path / "r3" / "config.json").read_text())["sparsekd_compression"]["round"] == 3
    assert main(["prune", "--model", str(out), "--energy", "0.9", "--target-reduction", "0.2",
                 "--out", str(tmp_path / "x")]) == 2
    assert "exactly one of" in capsys.readouterr().err
