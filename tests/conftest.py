"""Shared fixtures: tiny random models and a tiny tokenizer, built in-process (no network, no files)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Structured pruning removes directions; distillation restores the distribution.",
    "def add(a, b):\n    return a + b\n",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    " = Robert Boulter = \n Robert Boulter is an English film , television and theatre actor .",
]


def load_benchmark(name: str):
    """A script of benchmarks/ (not a package) imported as a module, for the tests that drive its main()."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on a few sentences (deterministic, ~10 ms)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAIN_TEXT, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def make_model(kind: str, vocab_size: int, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    if kind == "llama":
        cfg = LlamaConfig(**common)
    elif kind == "qwen3":
        cfg = Qwen3Config(head_dim=8, **common)
    elif kind == "gemma3":
        # Gemma 3's text model as the real 270M has it, in miniature: sliding-window and global layers (here a
        # window of 8 tokens, so windows longer than that see the difference), tied embeddings scaled by
        # sqrt(hidden), GeGLU (gelu_pytorch_tanh) MLPs, q/k norms, head_dim set apart from hidden/heads.
        from transformers import Gemma3TextConfig

        cfg = Gemma3TextConfig(head_dim=8, sliding_window=8, query_pre_attn_scalar=8,
                               layer_types=["sliding_attention", "full_attention"] * (common["num_hidden_layers"] // 2),
                               **common)
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session", params=["llama", "qwen3", "gemma3"])
def tiny_model(request, tiny_tokenizer):
    return make_model(request.param, len(tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer):
    return make_model("llama", len(tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_gemma3(tiny_tokenizer):
    return make_model("gemma3", len(tiny_tokenizer))


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_llama, tiny_tokenizer):
    """A saved HF directory of the tiny Llama + tokenizer, loadable by sparsekd_core.models.load_model."""
    out = tmp_path / "tiny-llama"
    tiny_llama.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


def make_flow_project(root):
    """A tiny saved model, a KD corpus (jsonl) and an eval text in ``root``: what the flow tests run on."""
    import json

    tok = make_tokenizer()
    model = make_model("llama", len(tok))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    docs = [" ".join(words[(i * 7 + j * 3) % len(words)] + str((i + j) % 17) for j in range(40)) for i in range(70)]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:60]))
    (root / "eval.txt").write_text("\n\n".join(docs[60:]))  # held out: no document of the corpus
    (root / "valid.txt").write_text("\n\n".join(docs[60:65]))
    return root
