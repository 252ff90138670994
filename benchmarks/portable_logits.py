"""Do pruned checkpoints load outside sparsekd with sparsekd's logits? (a check on real models, not a test)

    python benchmarks/portable_logits.py DIR [DIR ...] [--tokens 64]

For each checkpoint directory: a child process in which `sparsekd` and `sparsekd_core` cannot be imported loads it
with stock `AutoModelForCausalLM.from_pretrained` (`trust_remote_code=True` only when the config names remote code,
as SVD-factored and per-block-width checkpoints do) and computes the logits of the first N WikiText-2 test tokens
(BOS in front when the tokenizer adds one); this process loads it with sparsekd's loader and compares. Prints one
line per directory: class, parameters, max |Δ logits|.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CHILD = r"""
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("sparsekd", "sparsekd_core"):
            raise ImportError(f"{name} is blocked: this process checks the checkpoint loads without sparsekd")
sys.meta_path.insert(0, Block())
import torch
from transformers import AutoModelForCausalLM
directory, ids_file, out_file = sys.argv[1:4]
config = json.load(open(f"{directory}/config.json"))
remote = "auto_map" in config
model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, trust_remote_code=remote).eval()
ids = torch.load(ids_file)
with torch.no_grad():
    logits = model(input_ids=ids, use_cache=False).logits
torch.save({"logits": logits, "class": type(model).__name__, "remote": remote,
            "params": sum(p.numel() for p in model.parameters())}, out_file)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    from sparsekd_core.config import ModelConfig
    from sparsekd_core.data import load_text, with_bos
    from sparsekd_core.models import load_model

    for directory in args.dirs:
        loaded = load_model(ModelConfig(model=directory, dtype="fp32", device="cpu"), log=lambda m: None)
        text_ids = loaded.tokenizer(load_text("wikitext2:test"), add_special_tokens=False)["input_ids"][: args.tokens]
        ids = torch.tensor([with_bos(loaded.tokenizer, text_ids)])
        with torch.no_grad():
            ours = loaded.model(input_ids=ids, use_cache=False).logits
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(ids, f"{tmp}/ids.pt")
            subprocess.run([sys.executable, "-c", CHILD, directory, f"{tmp}/ids.pt", f"{tmp}/out.pt"], check=True)
            theirs = torch.load(f"{tmp}/out.pt")
        print(json.dumps({"dir": str(Path(directory)), "class": theirs["class"], "trust_remote_code": theirs["remote"],
                          "params": theirs["params"], "max_abs_diff": float((theirs["logits"] - ours).abs().max()),
                          "tokens": int(ids.shape[1])}), flush=True)


if __name__ == "__main__":
    main()
