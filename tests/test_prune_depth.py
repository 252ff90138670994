"""Depth pruning: angular distance by hand, the dropped-block checkpoint in stock transformers, KV cache indices,
every stage loads it, SVD on top, and the `prune --method depth` verb."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sparsekd.cli import main
from sparsekd_core.config import ModelConfig, PruneConfig
from sparsekd_core.models import load_model
from sparsekd_core.prune import angular_distances, decoder_layers, prune_model, save_compressed
from test_prune import make_arch

CALIB_TEXT = ("The quick brown fox jumps over the lazy dog. Structured pruning removes directions; "
              "distillation restores the distribution. ") * 30


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(CALIB_TEXT)
    return str(path)


def depth_config(calib, n):
    return PruneConfig(method="depth", drop_blocks=n, calibration=calib, calibration_samples=3, calibration_seq_len=16)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_angular_distance_equals_a_hand_computation(kind, tiny_tokenizer):
    model = make_arch(kind, len(tiny_tokenizer), layers=5)
    ids = torch.randint(0, len(tiny_tokenizer), (3, 12), generator=torch.Generator().manual_seed(3))
    got = angular_distances(model, ids, drop=2, batch_size=2)
    # By hand: the block inputs are transformers' hidden_states[0..L-1] (before the final norm); the output of the
    # last block is the last layer's output, taken here by running the final block on its input ourselves.
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        states = [h.double() for h in out.hidden_states[:5]]
        last = {}
        handle = decoder_layers(model)[-1].register_forward_hook(lambda m, a, o: last.setdefault("x", o))
        model(input_ids=ids, use_cache=False)
        handle.remove()
        states.append(last["x"].double())
    for l in range(0, 5 - 2 + 1):
        a, b = states[l].reshape(-1, states[l].shape[-1]), states[l + 2].reshape(-1, states[l].shape[-1])
        cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
        expected = float(torch.arccos(cos.clamp(-1, 1)).mean() / math.pi)
        assert got[l] == pytest.approx(expected, abs=1e-5), l
    assert len(got) == 4 and all(0 <= d <= 1 for d in got)


def test_dropped_blocks_checkpoint_loads_in_stock_transformers_and_matches_the_kept_blocks(tmp_path, calib,
                                                                                          tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    original = make_arch("llama", len(tiny_tokenizer), layers=6)
    pruned = make_arch("llama", len(tiny_tokenizer), layers=6)
    report = prune_model(pruned, tiny_tokenizer, depth_config(calib, 2), log=lambda m: None)
    summary = report.summary()
    dropped = summary["dropped_blocks"]
    assert len(dropped) == 2 and summary["num_layers_after"] == 4 and len(summary["distance_curve"]) == 5
    best = min(summary["distance_curve"], key=lambda r: r["distance"])
    assert dropped[0] == best["start"]
    save_compressed(pruned, tiny_tokenizer, tmp_path / "depth")

    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "depth").eval()
    assert stock.config.num_hidden_layers == 4 and len(stock.model.layers) == 4
    # Reference: the original model with the dropped blocks bypassed (each returns its input).
    hooks = [decoder_layers(original)[i].register_forward_hook(lambda m, args, out: args[0]) for i in dropped]
    ids = torch.randint(0, len(tiny_tokenizer), (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = original(input_ids=ids, use_cache=False).logits
        got = stock(input_ids=ids, use_cache=False).logits
    for h in hooks:
        h.remove()
    assert torch.allclose(got, expected, atol=1e-5)
    # The KV cache indices are renumbered: cached generation equals generation without a cache.
    with torch.no_grad():
        cached = stock.generate(ids[:1], max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = stock.generate(ids[:1], max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert [m.self_attn.layer_idx for m in stock.model.layers] == [0, 1, 2, 3]

    # Every sparsekd stage loads it (the compressed-checkpoint route), and SVD prunes it further.
    loaded = load_model(ModelConfig(model=str(tmp_path / "depth")), log=lambda m: None).model
    assert torch.allclose(loaded(input_ids=ids, use_cache=False).logits, expected, atol=1e-5)
    svd = prune_model(loaded, tiny_tokenizer, PruneConfig(target_reduction=0.5, calibration=calib,
                      calibration_samples=3, calibration_seq_len=16), log=lambda m: None).summary()
    assert svd["round"] == 2 and svd["mlp_reduction"] == pytest.approx(0.5, abs=0.005)


def test_qwen3_layer_types_are_cut_with_the_blocks(tmp_path, calib, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from transformers import Qwen3Config

    types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    config = Qwen3Config(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                         use_sliding_window=True, sliding_window=8, layer_types=types)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    report = prune_model(model, tiny_tokenizer, depth_config(calib, 1), log=lambda m: None)
    kept = [t for i, t in enumerate(types) if i not in report.summary()["dropped_blocks"]]
    assert model.config.layer_types == kept
    save_compressed(model, tiny_tokenizer, tmp_path / "q")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert stock.config.num_hidden_layers == 3 and stock.config.layer_types == kept
    ids = torch.randint(0, len(tiny_tokenizer), (1, 12), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(stock(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("values, message", [
    ({"method": "depth"}, "needs drop_blocks"),
    ({"method": "depth", "drop_blocks": 2, "target_reduction": 0.2}, "not target_reduction"),
    ({"method": "depth", "drop_blocks": 2, "calibration": "none"}, "calibration"),
    ({"method": "svd", "drop_blocks": 2, "target_reduction": 0.2}, "depth only"),
])
def test_depth_config_errors(values, message):
    with pytest.raises(ValueError, match=message):
        PruneConfig(**values)


def test_prune_verb_depth(tmp_path, tiny_model_dir, calib, capsys):
    out = tmp_path / "depth"
    argv = ["prune", "--model", str(tiny_model_dir), "--method", "depth", "--drop-blocks", "1", "--calibration",
            calib, "--calibration-samples", "2", "--calibration-seq-len", "16", "--out", str(out)]
    assert main(argv + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["method"] == "depth" and result["num_layers_after"] == 1 and len(result["distance_curve"]) == 2
    assert result["total_params_after"] < result["total_params_before"] and result["mlp_reduction"] == 0.5
    assert main(argv) == 0  # human output: the distance curve with the dropped span marked
    assert "<- dropped" in capsys.readouterr().out
    assert main(["eval", "--model", str(out), "--data", calib, "--ctx", "16", "--stride", "16", "--json"]) == 0
    assert main(argv[:-1] + [str(tmp_path / "again"), "--drop-blocks", "2"]) == 2  # the tiny model has 2 blocks
    assert "drop_blocks=2" in capsys.readouterr().err
