"""Step time of `sparsekd distill` in one process vs 2 gloo ranks (torchrun, DDP) at the same global batch, on CPU.

    python benchmarks/distill_ddp.py [--batch-size 8 --seq-len 128 --steps 12 --hidden 256 --layers 4]

A small random Llama (built from a config, no download), a byte-level BPE tokenizer trained on the packaged
WikiText-2 validation text, and a teacher cache of the model itself over WikiText-2 train are written to a temporary
directory; then the same `sparsekd distill` command runs three ways: 1 process with all the cores as threads, 1
process with 1 thread, and `torchrun --nproc-per-node 2` (1 thread per rank). Step time = tokens per step / the
run's tokens_per_s (validation and checkpoints excluded). On a machine with 2 cores, 2 ranks share the cores that
one process would use as threads, so no speedup is expected here; the figure to watch is the overhead of the
gradient all-reduce (gloo over localhost).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

parser = argparse.ArgumentParser()
parser.add_argument("--batch-size", type=int, default=8, help="global micro-batch (sequences)")
parser.add_argument("--seq-len", type=int, default=128)
parser.add_argument("--steps", type=int, default=12)
parser.add_argument("--hidden", type=int, default=256)
parser.add_argument("--layers", type=int, default=4)
args = parser.parse_args()


def build(root: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from sparsekd_core.cache import tokenizer_digest, write_cache
    from sparsekd_core.config import CacheConfig
    from sparsekd_core.data import load_text
    from sparsekd_core.models import weights_digest

    val_text = load_text("wikitext2:valid")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator([val_text], trainers.BpeTrainer(vocab_size=2000, special_tokens=["<unk>", "<s>", "</s>"],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                             show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 128,
        max_position_embeddings=args.seq_len, tie_word_embeddings=True), dtype=torch.float32).eval()
    model.save_pretrained(root / "student")
    tok.save_pretrained(root / "student")
    (root / "valid.txt").write_text(val_text[:20_000])
    sequences = args.batch_size * 8
    ids = torch.tensor(tok(load_text("wikitext2:train")[:400_000])["input_ids"])
    ids = ids[: sequences * args.seq_len].reshape(sequences, args.seq_len)
    cfg = CacheConfig(out=str(root / "cache.zarr"), data=str(root), top_k=16, chunk_size=8, seq_len=args.seq_len)
    fingerprint = {"model": "bench", "weights_digest": weights_digest(model), "tokenizer_digest": tokenizer_digest(tok),
                   "vocab_size": len(tok), "data": "wikitext2:train", "data_digest": "x", "num_samples": sequences,
                   "seed": 0, "dtype": "float32"}
    write_cache(model, ids, cfg, fingerprint, len(tok))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: Llama {args.layers} layers x {args.hidden}, {n_params / 1e6:.1f}M parameters; global batch "
          f"{args.batch_size} x {args.seq_len} tokens, {args.steps} steps; {os.cpu_count()} CPU cores, load "
          f"average {os.getloadavg()[0]:.1f} before the runs")


def distill(root: Path, name: str, threads: int, nproc: int) -> float:
    """Seconds per optimizer step of one run (from its tokens_per_s)."""
    command = ["-m", "sparsekd", "distill", "--student", str(root / "student"), "--cache", str(root / "cache.zarr"),
               "--out", str(root / name), "--batch-size", str(args.batch_size), "--max-steps", str(args.steps),
               "--eval-every", "0", "--checkpoint-every", str(args.steps + 1), "--val-data", str(root / "valid.txt"),
               "--val-tokens", "256", "--val-ctx", "128", "--lr", "1e-4", "--json"]
    if nproc > 1:
        command = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *command]
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
    result = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    return args.batch_size * args.seq_len / result["tokens_per_s"]


with tempfile.TemporaryDirectory() as tmp:
    root = Path(tmp)
    build(root)
    cores = os.cpu_count() or 1
    one = distill(root, "one", cores, 1)
    one_thread = distill(root, "one-thread", 1, 1)
    two = distill(root, "two", 1, 2)
    print(f"1 process x {cores} threads : {one:.3f} s/step")
    print(f"1 process x 1 thread   : {one_thread:.3f} s/step")
    print(f"2 gloo ranks x 1 thread (DDP, {args.batch_size // 2} sequences each): {two:.3f} s/step")
    print(f"ratio 2 ranks / 1 process ({cores} threads): {two / one:.2f}; 2 ranks / 1 process (1 thread): "
          f"{two / one_thread:.2f}  (< 1 = faster)")
