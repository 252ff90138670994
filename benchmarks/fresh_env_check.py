"""Issue 17's done-when check, for real: a factored checkpoint loads in a fresh virtual environment that holds only
torch, transformers, safetensors and what they need (versions from requirements.lock; no sparsekd), and its fp32
logits on a fixed input equal sparsekd's loader's.

    sparsekd prune --model smollm2-135m --target-reduction 0.35 --out /tmp/smol35
    python benchmarks/fresh_env_check.py /tmp/smol35 [--venv /tmp/freshenv]

The venv is made (python3 -m venv + pip install --no-deps of the pinned set) unless it exists. The load runs there
with ``python -I`` in an empty directory, so neither this checkout nor an installed sparsekd can be imported.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from sparsekd_core.config import ModelConfig
from sparsekd_core.models import load_model

ROOT = Path(__file__).resolve().parents[1]
# torch, transformers, safetensors and their install requirements (transitively), nothing else.
FRESH_PACKAGES = [
    "torch", "transformers", "safetensors", "annotated-doc", "annotated-types", "anyio", "click", "filelock",
    "fsspec", "h11", "hf-xet", "httpcore2", "httpx2", "huggingface_hub", "idna", "Jinja2", "markdown-it-py",
    "MarkupSafe", "mdurl", "mpmath", "networkx", "numpy", "packaging", "pydantic", "pydantic_core", "Pygments",
    "PyYAML", "regex", "rich", "setuptools", "shellingham", "sympy", "tokenizers", "tqdm", "truststore", "typer",
    "typing_extensions", "typing-inspection",
]
LOAD = r'''
import importlib.util, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

missing = [n for n in ("sparsekd", "sparsekd_core", "tasks", "flows") if importlib.util.find_spec(n) is None]
directory, out = sys.argv[1:3]
text = ("The tower is 324 metres (1,063 ft) tall, about the same height as an 81-storey building, and the tallest "
        "structure in Paris.")
ids = AutoTokenizer.from_pretrained(directory)([text], return_tensors="pt")["input_ids"]
model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32).eval()
with torch.no_grad():
    logits = model(input_ids=ids, use_cache=False).logits
torch.save({"ids": ids, "logits": logits}, out)
print(f"fresh env: torch {torch.__version__}, transformers {__import__('transformers').__version__}; "
      f"not importable: {', '.join(missing)}; loaded {type(model).__name__} from {type(model).__module__}")
'''


def pinned(names: list[str]) -> list[str]:
    """``name==version`` for each name, the version from requirements.lock."""
    def key(name: str) -> str:
        return name.lower().replace("_", "-")

    lock = {key(line.split("==")[0]): line.strip() for line in (ROOT / "requirements.lock").read_text().splitlines()
            if "==" in line and not line.startswith("#")}
    return [lock[key(name)] for name in names]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--venv", default="/tmp/freshenv")
    args = ap.parse_args()
    venv = Path(args.venv)
    python = venv / "bin" / "python"
    if not python.is_file():
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", *pinned(FRESH_PACKAGES)], check=True)
    with tempfile.TemporaryDirectory() as empty:
        out = Path(empty) / "logits.pt"
        done = subprocess.run([str(python), "-I", "-c", LOAD, str(Path(args.checkpoint).resolve()), str(out)],
                              cwd=empty, capture_output=True, text=True)
        if done.returncode:
            sys.exit(done.stderr[-3000:])
        print(done.stdout.strip().splitlines()[-1])
        theirs = torch.load(out)
    model = load_model(ModelConfig(model=args.checkpoint, dtype="fp32", device="cpu"), log=lambda _: None).model
    with torch.no_grad():
        ours = model(input_ids=theirs["ids"], use_cache=False).logits
    delta = (ours - theirs["logits"]).abs().max().item()
    print(f"{theirs['ids'].shape[1]} tokens × {ours.shape[-1]} logits: max |Δlogit| = {delta:.3g} "
          f"(max |logit| {ours.abs().max().item():.1f}); {'PASS' if delta <= 1e-5 else 'FAIL'} at 1e-5")


if __name__ == "__main__":
    main()
