"""Pruned checkpoints outside sparsekd: factored ones through their own modeling code (``trust_remote_code``),
WANDA and depth-pruned ones as stock architectures, lm-eval's ``hf`` backend on a factored directory, and the
done-when check: a process in which sparsekd cannot be imported loads a `sparsekd prune` checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, pipeline

from conftest import make_model
from sparsekd.cli import main
from sparsekd_core.config import ModelConfig, PruneConfig
from sparsekd_core.models import load_model
from sparsekd_core.prune import LowRankLinear, count_params, prune_model, save_compressed, save_dense
from sparsekd_core.prune.lowrank import COMPRESSION_KEY
from sparsekd_core.prune.remote_code import AUTO_MAP
from test_prune import make_arch

ATOL = 1e-5  # fp32 logits: the same two matmuls per factored layer in both loaders
CALIB = ["--calibration-samples", "4", "--calibration-seq-len", "32"]
BLOCKED = ("sparsekd", "sparsekd_core", "tasks", "flows")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices on 2 shared cores: one thread is faster
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ids(tiny_tokenizer):
    return torch.randint(0, len(tiny_tokenizer), (2, 20), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def sparsekd_load(path):
    return load_model(ModelConfig(model=str(path), dtype="fp32", device="cpu"), log=lambda _: None).model


def factored(model, tokenizer, out, reduction=0.5):
    """Plain-SVD prune (no calibration: fast) and save as sparsekd does."""
    prune_model(model, tokenizer, PruneConfig(target_reduction=reduction, calibration=None), log=lambda _: None)
    save_compressed(model, tokenizer, out)
    return out


@pytest.mark.parametrize("kind,config", [
    ("llama", {}), ("llama", {"mlp_bias": True, "tie_word_embeddings": True}), ("qwen2", {}), ("qwen3", {}),
    ("mistral", {}), ("phi3", {}), ("gemma", {}),
])
def test_trust_remote_code_builds_the_factored_model_of_every_architecture(kind, config, tmp_path, tiny_tokenizer,
                                                                            ids):
    out = factored(make_arch(kind, len(tiny_tokenizer), **config), tiny_tokenizer, tmp_path / "pruned")
    saved = json.loads((out / "config.json").read_text())
    assert saved["auto_map"] == {"AutoModelForCausalLM": "modeling_sparsekd.SparsekdForCausalLM"}
    assert saved["model_type"] == kind and (out / "modeling_sparsekd.py").is_file()

    ours = sparsekd_load(out)
    theirs = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    base = type(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out)))
    assert isinstance(theirs, base) and type(theirs) is not base and theirs.sparsekd_factored
    assert type(theirs).__name__ == base.__name__ and type(theirs).__module__.endswith(".modeling_sparsekd")
    low_rank = [m for m in theirs.modules() if type(m).__name__ == "LowRankLinear"]
    assert low_rank and not any(isinstance(m, LowRankLinear) for m in theirs.modules())  # its own class, not ours
    assert len(low_rank) == len(saved["sparsekd_compression"]["ranks"])
    if config.get("mlp_bias"):
        assert all(m.u.bias is not None for m in low_rank)
    assert count_params(theirs)["total"] == count_params(ours)["total"]
    if theirs.config.tie_word_embeddings:
        assert theirs.lm_head.weight is theirs.get_input_embeddings().weight
    assert torch.allclose(logits(theirs, ids), logits(ours, ids), atol=ATOL, rtol=0)


def test_save_pretrained_round_trips_and_generation_matches(tmp_path, tiny_tokenizer, ids):
    out = factored(make_model("llama", len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "pruned")
    expected = logits(sparsekd_load(out), ids)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    remote.save_pretrained(tmp_path / "again")
    tiny_tokenizer.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForCausalLM"] and "auto_map" in saved and "sparsekd_compression" in saved
    assert (tmp_path / "again" / "modeling_sparsekd.py").read_bytes() == (out / "modeling_sparsekd.py").read_bytes()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", trust_remote_code=True).eval()
    assert torch.allclose(logits(again, ids), expected, atol=ATOL, rtol=0)
    assert torch.allclose(logits(sparsekd_load(tmp_path / "again"), ids), expected, atol=ATOL, rtol=0)
    # from_config and the auto_map class itself build the same structure; both loaders give the same model.
    built = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out), trust_remote_code=True)
    code = sys.modules[type(remote).__module__]
    assert type(built) is type(remote) and type(code.SparsekdForCausalLM(remote.config)) is type(remote)
    direct = code.SparsekdForCausalLM.from_pretrained(out).eval()
    assert torch.allclose(logits(direct, ids), expected, atol=ATOL, rtol=0)
    assert code.AUTO_MAP == AUTO_MAP and code.COMPRESSION_KEY == COMPRESSION_KEY  # the copy agrees with sparsekd
    # Greedy generation, with generate() and through a pipeline, equals sparsekd's model's.
    with torch.no_grad():
        mine = sparsekd_load(out).generate(ids[:1], max_new_tokens=5, do_sample=False)
        assert torch.equal(remote.generate(ids[:1], max_new_tokens=5, do_sample=False), mine)
    generator = pipeline("text-generation", model=str(out), trust_remote_code=True)
    assert generator.model.sparsekd_factored
    text = tiny_tokenizer.decode(ids[0, :8])
    expected_text = tiny_tokenizer.decode(sparsekd_load(out).generate(tiny_tokenizer(text, return_tensors="pt")[
        "input_ids"], max_new_tokens=5, do_sample=False)[0])
    assert generator(text, max_new_tokens=5, do_sample=False)[0]["generated_text"] == expected_text


def test_older_checkpoints_load_and_exports_carry_no_code(tmp_path, tiny_tokenizer, ids):
    out = factored(make_model("llama", len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "pruned")
    expected = logits(sparsekd_load(out), ids)
    # A checkpoint written before the code travelled with it: no modeling file, no auto_map.
    (out / "modeling_sparsekd.py").unlink()
    config = json.loads((out / "config.json").read_text())
    del config["auto_map"]
    (out / "config.json").write_text(json.dumps(config))
    old = sparsekd_load(out)
    assert torch.equal(logits(old, ids), expected)
    save_compressed(old, tiny_tokenizer, tmp_path / "resaved")  # saving again adds the code
    assert (tmp_path / "resaved" / "modeling_sparsekd.py").is_file()
    loaded = sparsekd_load(tmp_path / "resaved")
    assert not hasattr(loaded.config, "auto_map")  # the in-memory model is sparsekd's, not the remote code's
    save_dense(loaded, tiny_tokenizer, tmp_path / "dense")
    assert "auto_map" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    assert not (tmp_path / "dense" / "modeling_sparsekd.py").exists()


def test_wanda_and_depth_checkpoints_load_in_stock_transformers(tmp_path, tiny_model_dir, ids):
    for method, budget in (("wanda", ["--target-reduction", "0.5"]), ("depth", ["--drop-blocks", "1"])):
        out = tmp_path / method
        assert main(["prune", "--model", str(tiny_model_dir), "--method", method, *budget, "--out", str(out),
                     *CALIB]) == 0
        assert not (out / "modeling_sparsekd.py").exists()
        assert "auto_map" not in json.loads((out / "config.json").read_text())
        stock = AutoModelForCausalLM.from_pretrained(out).eval()  # no trust_remote_code
        assert torch.allclose(logits(stock, ids), logits(sparsekd_load(out), ids), atol=ATOL, rtol=0)


def test_lm_eval_hf_backend_scores_the_factored_directory_as_its_dense_export(tmp_path, tiny_model_dir):
    """lm-eval loads the directory itself (``--model hf --model_args pretrained=DIR,trust_remote_code=True``)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from sparsekd_core.harness import LOCAL_TASK, run_lm_eval, sparsekd_local_tasks

    out, dense = tmp_path / "pruned", tmp_path / "dense"
    assert main(["prune", "--model", str(tiny_model_dir), "--target-reduction", "0.35", "--out", str(out),
                 "--dense-out", str(dense), *CALIB]) == 0
    manager = TaskManager(include_path=[str(sparsekd_local_tasks())])
    scores = {}
    for name, directory in (("factored", out), ("dense", dense)):
        result = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={directory},trust_remote_code=True,"
                                         "dtype=float32,device=cpu", tasks=[LOCAL_TASK], task_manager=manager, limit=2,
                                         log_samples=False)
        scores[name] = {k.removesuffix(",none"): v for k, v in result["results"][LOCAL_TASK].items()}
    loaded = load_model(ModelConfig(model=str(out), dtype="fp32", device="cpu"), log=lambda _: None)
    scores["sparsekd"] = run_lm_eval(loaded.model, loaded.tokenizer, [LOCAL_TASK], limit=2)[LOCAL_TASK]
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert scores["factored"][metric] == pytest.approx(scores["dense"][metric], rel=1e-5), metric
        assert scores["factored"][metric] == pytest.approx(scores["sparsekd"][metric], rel=1e-6), metric


NO_SPARSEKD = r'''
import importlib.abc
import sys

BLOCKED = {blocked!r}


class NoSparsekd(importlib.abc.MetaPathFinder):
    """Stands for an environment where sparsekd is not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(f"No module named {{name!r}} (this process has no sparsekd)")


sys.meta_path.insert(0, NoSparsekd())
for name in BLOCKED:
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{{name}} is importable")

import torch
from transformers import AutoModelForCausalLM

directory, ids_file, logits_file = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32).eval()
with torch.no_grad():
    logits = model(input_ids=torch.load(ids_file), use_cache=False).logits
torch.save(logits, logits_file)
assert not [m for m in sys.modules if m.partition(".")[0] in BLOCKED]
print(type(model).__name__, type(model).__module__.rpartition(".")[2])
'''.format(blocked=BLOCKED)


def test_done_when_a_pruned_checkpoint_loads_where_sparsekd_cannot_be_imported(tmp_path, tiny_model_dir, ids):
    out = tmp_path / "pruned35"
    assert main(["prune", "--model", str(tiny_model_dir), "--target-reduction", "0.35", "--out", str(out),
                 *CALIB]) == 0
    torch.save(ids, tmp_path / "ids.pt")
    # -I: no PYTHONPATH, no user site, no cwd on sys.path; the blocker refuses what the venv's editable install offers.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    done = subprocess.run([sys.executable, "-I", "-c", NO_SPARSEKD, str(out), str(tmp_path / "ids.pt"),
                           str(tmp_path / "logits.pt")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "LlamaForCausalLM modeling_sparsekd"
    theirs = torch.load(tmp_path / "logits.pt")
    ours = logits(sparsekd_load(out), ids)
    assert (theirs - ours).abs().max().item() <= ATOL
