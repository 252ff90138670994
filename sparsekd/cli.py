"""`sparsekd <verb>`: a table from verb to the function that runs it (stage verbs call sparsekd_core).

Every verb takes ``--json`` and then prints one JSON object as its last stdout line; progress and logs go to
stderr. Bad input (a config value, a missing file, an unknown alias) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from sparsekd_core.config import ConfigError, DataConfig, EvalConfig, ModelConfig, build, load_yaml

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (no usage dump), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message}")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _sections(args: argparse.Namespace, defaults: dict[str, dict[str, str]]) -> dict[str, dict[str, Any]]:
    """Config sections from --config YAML, overridden by the flags the user gave (None = not given)."""
    loaded = load_yaml(args.config) if getattr(args, "config", None) else {}
    sections: dict[str, dict[str, Any]] = {}
    for section, flag_to_field in defaults.items():
        values = dict(loaded.get(section) or {})
        for flag, field in flag_to_field.items():
            value = getattr(args, flag, None)
            if value is not None:
                values[field] = value
        sections[section] = values
    unknown = set(loaded) - set(defaults)
    if unknown:
        raise ConfigError(f"config: unknown section(s) {sorted(unknown)}; allowed: {sorted(defaults)}")
    return sections


def _emit(result: dict, as_json: bool, human: str) -> None:
    if as_json:
        print(json.dumps(result))
    else:
        print(human)


# ---------------------------------------------------------------------------------------------------------------- eval

EVAL_FLAGS = {
    "model": {"model": "model", "dtype": "dtype", "device": "device", "revision": "revision",
              "trust_remote_code": "trust_remote_code"},
    "data": {"data": "data", "max_tokens": "max_tokens"},
    "eval": {"ctx": "ctx", "stride": "stride", "protocol": "protocol", "batch_size": "batch_size"},
}


def _add_model_flags(p: argparse.ArgumentParser, flag: str = "--model") -> None:
    p.add_argument(flag, dest="model", help="alias (smollm2-135m), hub id, local directory or .gguf file")
    p.add_argument("--dtype", help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32")
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--revision", help="hub revision for hub ids")
    p.add_argument("--trust-remote-code", action="store_true", default=None, help="allow hub code to run (off)")


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="sliding-window perplexity (paper or standard protocol)")
    _add_model_flags(p)
    p.add_argument("--data", help="named source (wikitext2:test, ...) or a local text/jsonl/parquet file")
    p.add_argument("--ctx", type=int, help="window length in tokens (default 512)")
    p.add_argument("--stride", type=int, help="offset between window starts (default 256)")
    p.add_argument("--protocol", help="paper (every token of every window) | standard (each token once)")
    p.add_argument("--max-tokens", type=int, help="keep the first N tokens of the tokenized text")
    p.add_argument("--batch-size", type=int, help="windows per forward pass (default 1)")
    p.add_argument("--config", help="YAML file with sections model/data/eval (flags override it)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from sparsekd_core.data import load_text
    from sparsekd_core.eval import make_windows, perplexity, tokenize_text
    from sparsekd_core.models import load_model

    sections = _sections(args, EVAL_FLAGS)
    sections["data"].setdefault("data", "wikitext2:test")
    if "model" not in sections["model"]:
        raise ConfigError("model.model: required; give --model (e.g. --model smollm2-135m)")
    model_cfg = build(ModelConfig, "model", sections["model"])
    data_cfg = build(DataConfig, "data", sections["data"])
    eval_cfg = build(EvalConfig, "eval", sections["eval"])

    loaded = load_model(model_cfg, log=log)
    ids = tokenize_text(loaded.tokenizer, load_text(data_cfg.data), data_cfg.max_tokens)
    if ids.numel() < 2:
        raise ConfigError(f"data.data={data_cfg.data!r}: the text has {ids.numel()} token(s); at least 2 are needed")
    n_windows = len(make_windows(ids.numel(), eval_cfg.ctx, eval_cfg.stride, eval_cfg.protocol))
    log(f"eval: {ids.numel()} tokens, {n_windows} windows of {eval_cfg.ctx} (stride {eval_cfg.stride}), "
        f"protocol {eval_cfg.protocol}, {loaded.device.type} {str(loaded.dtype).removeprefix('torch.')}")
    with tqdm(total=n_windows, desc="eval", unit="win", file=sys.stderr, disable=None) as bar:
        res = perplexity(loaded.model, ids, eval_cfg, progress=bar.update)
    result = {
        "ppl": res.ppl,
        "nll": res.nll,
        "tokens": res.tokens,
        "tokens_per_s": res.tokens_per_s,
        "protocol": eval_cfg.protocol,
        "ctx": eval_cfg.ctx,
        "stride": eval_cfg.stride,
        "windows": res.windows,
        "text_tokens": int(ids.numel()),
        "seconds": res.seconds,
        "batch_size": eval_cfg.batch_size,
        "model": model_cfg.model,
        "data": data_cfg.data,
        "device": loaded.device.type,
        "dtype": str(loaded.dtype).removeprefix("torch."),
    }
    _emit(result, args.json, f"ppl {res.ppl:.4f} (nll {res.nll:.5f}) over {res.tokens} scored tokens, "
          f"{res.windows} windows, {res.tokens_per_s:.0f} tokens/s [{eval_cfg.protocol} protocol, "
          f"ctx {eval_cfg.ctx}, stride {eval_cfg.stride}]")
    return 0


# ---------------------------------------------------------------------------------------------------------------- cache

CACHE_FLAGS = {
    "model": EVAL_FLAGS["model"],
    "cache": {"out": "out", "data": "data", "num_samples": "num_samples", "seq_len": "seq_len", "seed": "seed",
              "top_k": "top_k", "batch_size": "batch_size", "chunk_size": "chunk_size"},
}


def add_cache_parser(sub) -> None:
    p = sub.add_parser("cache", help="cache the model's top-k next-token distribution over a corpus (Zarr v3)")
    _add_model_flags(p)
    p.add_argument("--data", help="mixture (mix:paper-offline, default), named source or local file")
    p.add_argument("--out", help="Zarr store: local directory or fsspec URL (s3://...)")
    p.add_argument("--num-samples", type=int, help="sequences (required for a mixture)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 512)")
    p.add_argument("--seed", type=int, help="corpus seed (default 0)")
    p.add_argument("--top-k", type=int, help="ids kept per position (default 32)")
    p.add_argument("--batch-size", type=int, help="sequences per forward pass (default 1; divides --chunk-size)")
    p.add_argument("--chunk-size", type=int, help="sequences per Zarr chunk (default 16)")
    p.add_argument("--config", help="YAML file with sections model/cache (flags override it)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.set_defaults(func=cmd_cache)


def _progress(desc: str, unit: str):
    from tqdm.auto import tqdm

    return lambda total: tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None)


def cmd_cache(args: argparse.Namespace) -> int:
    from sparsekd_core.cache import run_cache
    from sparsekd_core.config import CacheConfig
    from sparsekd_core.models import load_model

    sections = _sections(args, CACHE_FLAGS)
    if "model" not in sections["model"]:
        raise ConfigError("model.model: required; give --model (e.g. --model smollm2-135m)")
    if "out" not in sections["cache"]:
        raise ConfigError("cache.out: required; give --out DIR (where the Zarr store goes)")
    model_cfg = build(ModelConfig, "model", sections["model"])
    cache_cfg = build(CacheConfig, "cache", sections["cache"])
    loaded = load_model(model_cfg, log=log)
    res = run_cache(loaded, cache_cfg, log=log, progress_factory=_progress("cache", "seq"))
    result = res.as_dict() | {"model": model_cfg.model, "data": cache_cfg.data}
    _emit(result, args.json, f"cache {res.path}: {res.sequences} sequences, {res.tokens} tokens, top-{res.top_k}, "
          f"{res.bytes_per_token:.1f} bytes/token, {res.tokens_per_s:.0f} tokens/s, "
          f"{res.resumed_chunks} chunks resumed")
    return 0


# ---------------------------------------------------------------------------------------------------------------- distill

DISTILL_OPTIONS = {  # flag dest -> (type, help); the field of the same name in DistillConfig
    "cache": (str, "teacher cache written by `sparsekd cache` (any model with the student's tokenizer)"),
    "out": (str, "output directory (HF-loadable student, checkpoint/, distill.json)"),
    "alpha": (float, "KD weight (default 0.5; 0 = CE-only control)"),
    "temperature": (float, "KD temperature T (default 2.0)"),
    "tail": (str, "topk (default) | bucket | paper: mass outside the cached top-k"),
    "lr": (float, "peak learning rate (default 2e-5)"),
    "min_lr_ratio": (float, "cosine decay floor as a fraction of lr (default 0.1)"),
    "warmup_steps": (int, "linear warmup steps (default 5%% of the steps)"),
    "weight_decay": (float, "AdamW weight decay (default 0)"),
    "grad_clip": (float, "gradient-norm clip (default 1.0; 0 = off)"),
    "batch_size": (int, "sequences per micro-step (default 1)"),
    "grad_accum": (int, "micro-steps per optimizer step (default 1)"),
    "epochs": (int, "passes over the cache (default 1)"),
    "max_steps": (int, "stop after N optimizer steps"),
    "seed": (int, "seed for data order and RNG (default 0)"),
    "eval_every": (int, "validation every N steps (default 50; also at start and end)"),
    "val_data": (str, "held-out validation text (default wikitext2:valid; never wikitext2:test)"),
    "val_tokens": (int, "validation tokens (default 2048)"),
    "val_ctx": (int, "validation window (default 256)"),
    "patience": (int, "stopping rule: evaluations without a min-delta gain (default 3)"),
    "min_delta": (float, "stopping rule: relative ppl gain that counts (default 0.002)"),
    "checkpoint_every": (int, "resumable checkpoint every N steps (default 10)"),
    "max_bad_steps": (int, "abort after N NaN/inf steps in a row (default 5)"),
}
DISTILL_FLAGS = {
    "model": EVAL_FLAGS["model"],
    "distill": {name: name for name in DISTILL_OPTIONS},
}


def add_distill_parser(sub) -> None:
    p = sub.add_parser("distill", help="train a student on a teacher cache (offline self-referential KD)")
    _add_model_flags(p, "--student")
    for name, (kind, help_text) in DISTILL_OPTIONS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, help=help_text)
    p.add_argument("--config", help="YAML file with sections model/distill (flags override it)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.set_defaults(func=cmd_distill)


def cmd_distill(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from sparsekd_core.config import DistillConfig
    from sparsekd_core.distill import distill
    from sparsekd_core.models import load_model

    sections = _sections(args, DISTILL_FLAGS)
    if "model" not in sections["model"]:
        raise ConfigError("model.model: required; give --student (e.g. --student smollm2-135m)")
    for field in ("cache", "out"):
        if field not in sections["distill"]:
            raise ConfigError(f"distill.{field}: required; give --{field}")
    if sections["model"].get("dtype", "auto") == "auto":
        sections["model"]["dtype"] = "fp32"  # fp32 master weights; bf16 autocast on CUDA
    model_cfg = build(ModelConfig, "model", sections["model"])
    cfg = build(DistillConfig, "distill", sections["distill"])
    loaded = load_model(model_cfg, log=log)
    bar = None

    def progress(step: int, total: int, postfix: dict) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, initial=step - 1, desc="distill", unit="step", file=sys.stderr, disable=None)
        bar.update(1)
        bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    try:
        res = distill(cfg, loaded.model, loaded.tokenizer, student_spec=model_cfg.model, log=log, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    result = res.as_dict() | {"student": model_cfg.model, "cache": cfg.cache, "alpha": cfg.alpha,
                              "temperature": cfg.temperature, "tail": cfg.tail}
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    _emit(result, args.json, f"distilled {res.steps} steps -> {res.out}: kd {fmt(res.kd_loss_first)} -> "
          f"{fmt(res.kd_loss_last)}, ce {fmt(res.ce_loss_first)} -> {fmt(res.ce_loss_last)}, best val ppl "
          f"{fmt(res.val_ppl_best)} (step {res.best_step}; start {fmt(res.val_ppl_start)}), {res.tokens_per_s:.0f} "
          f"tokens/s, stop: {res.stop_reason}")
    return 0


# ---------------------------------------------------------------------------------------------------------------- main

VERBS: list[Callable] = [add_eval_parser, add_cache_parser, add_distill_parser]


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparsekd", description="Structured SVD pruning + self-referential KD, as experiments.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    for add in VERBS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from sparsekd_core.data import DataQualityError, DataUnavailableError
    from sparsekd_core.distill import DistillError
    from sparsekd_core.models import ModelLoadError

    parser = make_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return EXIT_BAD_INPUT
        return args.func(args)
    except (ConfigError, ModelLoadError, DataQualityError, DataUnavailableError, DistillError) as err:
        print(f"sparsekd: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("sparsekd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
