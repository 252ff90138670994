"""Width pruning: the importance against plain matmuls, the least important neurons go (and the model equals the
original with those neurons silenced), exact accounting within 0.5 pp, the uniform checkpoint in stock transformers,
per-block sizes through the checkpoint's modeling code, Phi-3's fused gate_up_proj, iterative rounds, and eval and
distill on the output."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TRAIN_TEXT
from sparsekd.cli import main
from sparsekd_core.config import ConfigError, ModelConfig, PruneConfig
from sparsekd_core.models import load_model
from sparsekd_core.prune import count_params, find_mlp_matrices, prune_model, save_compressed, save_dense
from sparsekd_core.prune.calibration import calibration_ids
from sparsekd_core.prune.width import mlp_blocks, neuron_importance
from test_prune import make_arch, one_thread  # noqa: F401  (autouse: tiny matrices run fastest on one thread)

CALIB_TEXT = ("The quick brown fox jumps over the lazy dog. Structured pruning removes directions; "
              "distillation restores the distribution. ") * 30
SAMPLES, SEQ_LEN = 3, 16


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CALIB_TEXT)
    return str(path)


@pytest.fixture(scope="module")
def ids(tiny_tokenizer):
    return torch.randint(0, len(tiny_tokenizer), (2, 20), generator=torch.Generator().manual_seed(1))


def width_config(calib, target, **fields) -> PruneConfig:
    return PruneConfig(method="width", target_reduction=target, calibration=calib, calibration_samples=SAMPLES,
                       calibration_seq_len=SEQ_LEN, **fields)


def quiet(_message: str) -> None:
    pass


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def sparsekd_load(path):
    return load_model(ModelConfig(model=str(path), dtype="fp32", device="cpu"), log=quiet).model


@torch.no_grad()
def importance_by_hand(model, ids) -> list[torch.Tensor]:
    """mean_t |silu(x W_gateᵀ) ⊙ (x W_upᵀ)| per neuron, from each MLP's input x and its weights (plain matmuls)."""
    assert model.config.hidden_act == "silu"
    inputs = []
    hooks = [layer.mlp.register_forward_hook(lambda m, args, out: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
             for layer in model.model.layers]
    model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    result = []
    for layer, x in zip(model.model.layers, inputs):
        mlp = layer.mlp
        if hasattr(mlp, "gate_up_proj"):  # Phi-3: rows [0, I) gate, [I, 2I) up
            gate_w, up_w = mlp.gate_up_proj.weight.chunk(2, dim=0)
        else:
            gate_w, up_w = mlp.gate_proj.weight, mlp.up_proj.weight
        h = torch.nn.functional.silu(x.double() @ gate_w.double().T) * (x.double() @ up_w.double().T)
        result.append(h.abs().mean(0))
    return result


def hand_counts(model) -> tuple[int, int]:
    """(MLP parameters, total parameters) by parameter names alone."""
    params = dict(model.named_parameters())
    return sum(p.numel() for n, p in params.items() if ".mlp." in n), sum(p.numel() for p in params.values())


@pytest.mark.parametrize("kind", ["llama", "phi3"])
def test_importance_equals_plain_matmuls_on_the_mlp_inputs(kind, tiny_tokenizer):
    model = make_arch(kind, len(tiny_tokenizer), layers=3)
    tokens = torch.randint(0, len(tiny_tokenizer), (5, 12), generator=torch.Generator().manual_seed(4))
    got = neuron_importance(model, mlp_blocks(find_mlp_matrices(model)), tokens, batch_size=2)
    expected = importance_by_hand(model, tokens)
    assert len(got) == 3
    for a, b in zip(got, expected):
        assert a.shape == (64,) and torch.allclose(a, b, rtol=1e-5, atol=1e-9)
        assert a.std() > 0.05 * a.mean()  # the neurons differ: the ranking below means something


@pytest.mark.parametrize("kind", ["llama", "phi3"])
def test_the_least_important_neurons_go_and_the_rest_is_the_original_model(kind, calib, tiny_tokenizer, ids):
    original = make_arch(kind, len(tiny_tokenizer), layers=3)
    pruned = make_arch(kind, len(tiny_tokenizer), layers=3)
    calibration = calibration_ids(tiny_tokenizer, calib, SAMPLES, SEQ_LEN)
    scores = importance_by_hand(original, calibration)
    report = prune_model(pruned, tiny_tokenizer, width_config(calib, 0.25), log=quiet)
    width = report.settings["intermediate_size"]
    assert width == 48 and report.settings["widths_after"] == [48] * 3  # 0.25 of 64 neurons: exact here

    silenced = []
    for layer, score, old, new in zip(range(3), scores, original.model.layers, pruned.model.layers):
        keep = torch.sort(torch.argsort(score, descending=True)[:width]).values
        removed = sorted(set(range(64)) - set(keep.tolist()))
        assert score[keep].min() > score[removed].max()  # every kept neuron outranks every removed one
        if kind == "phi3":
            assert torch.equal(new.mlp.gate_up_proj.weight, old.mlp.gate_up_proj.weight[torch.cat([keep, keep + 64])])
        else:
            assert torch.equal(new.mlp.gate_proj.weight, old.mlp.gate_proj.weight[keep])
            assert torch.equal(new.mlp.up_proj.weight, old.mlp.up_proj.weight[keep])
        assert torch.equal(new.mlp.down_proj.weight, old.mlp.down_proj.weight[:, keep])
        silenced.append((old.mlp.down_proj, removed))
    # The pruned model is the original with the removed neurons' activations set to zero.
    hooks = [down.register_forward_pre_hook(lambda m, args, r=removed: (args[0].index_fill(-1, torch.tensor(r), 0),))
             for down, removed in silenced]
    expected = logits(original, ids)
    for h in hooks:
        h.remove()
    assert torch.allclose(logits(pruned, ids), expected, atol=1e-5)
    assert not torch.allclose(logits(original, ids), expected, atol=1e-3)  # and silencing them did change it


@pytest.mark.parametrize("kind,config", [("llama", {}), ("llama", {"mlp_bias": True}), ("phi3", {})])
@pytest.mark.parametrize("schedule", ["uniform", "tiered"])
@pytest.mark.parametrize("target", [0.15, 0.37])
def test_the_achieved_reduction_is_within_half_a_point_counted_by_hand(kind, config, schedule, target, calib,
                                                                      tiny_tokenizer):
    model = make_arch(kind, len(tiny_tokenizer), mlp=256, layers=4, **config)
    mlp_dense, total_dense = hand_counts(model)
    summary = prune_model(model, tiny_tokenizer, width_config(calib, target, schedule=schedule), log=quiet).summary()
    mlp_after, total_after = hand_counts(model)
    assert (summary["mlp_params_before"], summary["mlp_params_after"]) == (mlp_dense, mlp_after)
    assert (summary["total_params_before"], summary["total_params_after"]) == (total_dense, total_after)
    assert summary["mlp_reduction"] == pytest.approx(1 - mlp_after / mlp_dense)
    assert abs(summary["mlp_reduction"] - target) <= 0.005
    widths = summary["widths_after"]
    assert widths == [layer.mlp.down_proj.in_features for layer in model.model.layers]
    if schedule == "uniform":
        assert len(set(widths)) == 1 and model.config.intermediate_size == widths[0]
    else:  # tiered: the edge blocks (first and last) keep more than the middle ones
        assert min(widths[0], widths[-1]) > max(widths[1:-1]) and model.config.intermediate_size == max(widths)
    assert len(summary["layers"]) == len(find_mlp_matrices(model))
    assert all(row["params_after"] < row["params_before"] and 0 < row["energy"] < 1 for row in summary["layers"])


@pytest.mark.parametrize("kind", ["llama", "phi3", "gemma"])
def test_a_uniform_checkpoint_is_stock_and_loads_with_the_same_logits(kind, tmp_path, calib, tiny_tokenizer, ids):
    dense = make_arch(kind, len(tiny_tokenizer), mlp=128)
    model = make_arch(kind, len(tiny_tokenizer), mlp=128)
    summary = prune_model(model, tiny_tokenizer, width_config(calib, 0.3), log=quiet).summary()
    out = save_compressed(model, tiny_tokenizer, tmp_path / "width")
    saved = json.loads((out / "config.json").read_text())
    assert saved["intermediate_size"] == summary["intermediate_size"] < 128
    assert "auto_map" not in saved and "widths" not in saved["sparsekd_compression"]
    assert not (out / "modeling_sparsekd.py").exists()

    stock = AutoModelForCausalLM.from_pretrained(out).eval()  # no trust_remote_code, no custom code
    assert type(stock) is type(dense)
    ours = sparsekd_load(out)
    assert torch.allclose(logits(stock, ids), logits(ours, ids), atol=1e-6)
    assert torch.allclose(logits(ours, ids), logits(model, ids), atol=1e-6)
    assert not torch.allclose(logits(ours, ids), logits(dense, ids), atol=1e-3)
    assert count_params(stock)["total"] == summary["total_params_after"] < count_params(dense)["total"]


def test_per_block_sizes_load_through_the_modeling_code_and_svd_prunes_them_further(tmp_path, calib,
                                                                                     tiny_tokenizer, ids):
    model = make_arch("phi3", len(tiny_tokenizer), mlp=128, layers=4)
    summary = prune_model(model, tiny_tokenizer, width_config(calib, 0.3, schedule="tiered"), log=quiet).summary()
    widths = summary["widths_after"]
    assert len(set(widths)) > 1 and summary["intermediate_size"] is None
    out = save_compressed(model, tiny_tokenizer, tmp_path / "tiered")
    saved = json.loads((out / "config.json").read_text())
    narrower = {f"model.layers.{i}.mlp": w for i, w in enumerate(widths) if w < max(widths)}
    assert saved["sparsekd_compression"]["widths"] == narrower and saved["intermediate_size"] == max(widths)
    assert saved["auto_map"] and (out / "modeling_sparsekd.py").is_file()

    ours = sparsekd_load(out)
    theirs = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    expected = logits(model, ids)
    assert torch.allclose(logits(ours, ids), expected, atol=1e-6)
    assert torch.allclose(logits(theirs, ids), expected, atol=1e-6)
    assert [layer.mlp.down_proj.in_features for layer in theirs.model.layers] == widths
    with pytest.raises(RuntimeError, match="mismatched"):  # without the code: a loud error, never a wrong model
        AutoModelForCausalLM.from_pretrained(out)
    with pytest.raises(ConfigError, match="per-block MLP sizes"):
        save_dense(ours, tiny_tokenizer, tmp_path / "dense")

    # An SVD round on top: factored projections inside resized blocks, both loaders again.
    svd = prune_model(ours, tiny_tokenizer, PruneConfig(target_reduction=0.6, calibration=None), log=quiet).summary()
    assert svd["round"] == 2 and abs(svd["mlp_reduction"] - 0.6) <= 0.005
    out2 = save_compressed(ours, tiny_tokenizer, tmp_path / "tiered-svd")
    record = json.loads((out2 / "config.json").read_text())["sparsekd_compression"]
    assert record["ranks"] and record["widths"] == narrower
    expected = logits(ours, ids)
    assert torch.allclose(logits(sparsekd_load(out2), ids), expected, atol=1e-5)
    theirs = AutoModelForCausalLM.from_pretrained(out2, trust_remote_code=True).eval()
    assert torch.allclose(logits(theirs, ids), expected, atol=1e-5)


@pytest.mark.parametrize("values, message", [
    ({"method": "width"}, "exactly one of target_reduction"),
    ({"method": "width", "energy": 0.9}, "energy applies to svd only"),
    ({"method": "width", "target_reduction": 0.2, "calibration": "none"}, "calibration"),
    ({"method": "width", "target_reduction": 0.2, "schedule": "energy"}, "uniform or tiered"),
    ({"method": "width", "target_reduction": 0.2, "whiten": True}, "uniform or tiered, and no whiten"),
    ({"method": "width", "target_reduction": 0.2, "drop_blocks": 2}, "depth only"),
])
def test_width_config_errors(values, message):
    with pytest.raises(ValueError, match=message):
        PruneConfig(**values)


def test_the_schedule_defaults_to_uniform_for_width_and_tiered_for_svd():
    assert PruneConfig(method="width", target_reduction=0.2).resolved_schedule == "uniform"
    assert PruneConfig(target_reduction=0.2).resolved_schedule == "tiered"


def test_unreachable_targets_and_factored_models_are_config_errors(calib, tiny_tokenizer):
    model = make_arch("llama", len(tiny_tokenizer))  # 64 neurons in 2 blocks: 1/64 steps, 1.6 pp
    with pytest.raises(ConfigError, match="0.5 pp"):
        prune_model(model, tiny_tokenizer, width_config(calib, 0.26), log=quiet)
    prune_model(model, tiny_tokenizer, width_config(calib, 0.25), log=quiet)
    with pytest.raises(ConfigError, match="already at an MLP reduction of 0.25"):
        prune_model(model, tiny_tokenizer, width_config(calib, 0.2), log=quiet)
    prune_model(model, tiny_tokenizer, PruneConfig(target_reduction=0.5, calibration=None), log=quiet)
    with pytest.raises(ConfigError, match="prune width first, then svd"):
        prune_model(model, tiny_tokenizer, width_config(calib, 0.6), log=quiet)


def test_prune_verb_rounds_then_prune_again_eval_and_distill(tmp_path, tiny_model_dir, calib, capsys):
    """Two rounds in one call (0.25 then 0.5 of the dense MLP), a third from the saved checkpoint, then eval and
    distill take it; the distilled student keeps its width and is still a stock checkpoint."""
    calibration = ["--calibration", calib, "--calibration-samples", "2", "--calibration-seq-len", "16"]
    rounds = tmp_path / "rounds"
    assert main(["prune", "--model", str(tiny_model_dir), "--method", "width", "--target-reduction", "0.25,0.5",
                 *calibration, "--out", str(rounds), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["method"] == "width" and result["round"] == 2 and result["intermediate_size"] == 32
    assert [r["mlp_reduction"] for r in result["rounds"]] == [0.25, 0.5] and result["mlp_reduction"] == 0.5
    assert result["total_params_after"] < result["total_params_before"]

    again = tmp_path / "again"
    assert main(["prune", "--model", str(rounds), "--method", "width", "--target-reduction", "0.625", *calibration,
                 "--out", str(again), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["round"] == 3 and result["mlp_reduction"] == 0.625 and result["widths_before"] == [32, 32]
    assert result["mlp_reduction_this_round"] == 0.25 and result["intermediate_size"] == 24
    record = json.loads((again / "config.json").read_text())["sparsekd_compression"]
    assert [h["method"] for h in record["history"]] == ["width"] * 3 and record["mlp_reduction"] == 0.625

    val = tmp_path / "valid.txt"
    val.write_text(" ".join(TRAIN_TEXT) * 3)
    assert main(["eval", "--model", str(again), "--data", str(val), "--ctx", "32", "--stride", "32", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["ppl"] > 1 and evaluated["mlp_reduction"] == 0.625  # the evaluated model is the pruned one

    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Document {i}. {t}" for i in range(3) for t in TRAIN_TEXT))
    cache = tmp_path / "c.zarr"
    assert main(["cache", "--model", str(tiny_model_dir), "--data", str(text), "--out", str(cache), "--seq-len", "16",
                 "--top-k", "4", "--chunk-size", "4", "--batch-size", "4"]) == 0
    capsys.readouterr()
    student = tmp_path / "student"
    assert main(["distill", "--student", str(again), "--cache", str(cache), "--out", str(student), "--max-steps", "3",
                 "--lr", "1e-2", "--val-data", str(val), "--val-tokens", "64", "--val-ctx", "32", "--json"]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trained["steps"] == 3 and trained["mlp_reduction"] == 0.625  # the student kept its size
    stock = AutoModelForCausalLM.from_pretrained(student).eval()
    assert stock.config.intermediate_size == 24
    before, after = sparsekd_load(again), sparsekd_load(student)
    ids = torch.randint(0, stock.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(logits(stock, ids), logits(after, ids), atol=1e-6)
    assert not torch.allclose(logits(after, ids), logits(before, ids), atol=1e-4)  # distillation did train it
