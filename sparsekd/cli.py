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


# --------------------------------------------------------------------------------------------------------------- prune

PRUNE_FLAGS = {
    "model": EVAL_FLAGS["model"],
    "prune": {"method": "method", "target_reduction": "target_reduction", "energy": "energy",
              "schedule": "schedule", "whiten": "whiten", "calibration": "calibration",
              "calibration_samples": "calibration_samples", "calibration_seq_len": "calibration_seq_len",
              "damping": "damping", "tier_edge_fraction": "tier_edge_fraction",
              "tier_edge_weight": "tier_edge_weight", "tier_gate_weight": "tier_gate_weight"},
}


def _targets(text: str) -> list[float]:
    """--target-reduction 0.15 or a list of successive rounds 0.15,0.22,0.29 (or 'paper' = the 8 paper rounds)."""
    from sparsekd_core.config import PAPER_ROUND_TARGETS

    if text == "paper":
        return list(PAPER_ROUND_TARGETS)
    try:
        return [float(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number in (0, 1), a comma-separated increasing list "
                                         "of rounds (0.15,0.35) or 'paper'") from None


def add_prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="structured SVD (low-rank) or WANDA pruning of the MLP projections")
    _add_model_flags(p)
    p.add_argument("--method", help="svd (structured low-rank, default) | wanda (unstructured)")
    p.add_argument("--target-reduction", type=_targets, metavar="R",
                   help="fraction of the dense model's MLP parameters removed (cumulative), e.g. 0.15; a list "
                        "0.15,0.35 runs successive rounds; 'paper' = the paper's 8 rounds")
    p.add_argument("--energy", type=float, metavar="TAU", help="svd: spectral energy kept per matrix, e.g. 0.97")
    p.add_argument("--schedule", help="tiered (default) | uniform | energy (one energy threshold for all): how "
                                      "the reduction is spread over matrices")
    p.add_argument("--whiten", action=argparse.BooleanOptionalAction, default=None,
                   help="activation-aware (whitened) SVD; default on when calibration data is given")
    p.add_argument("--calibration", help="calibration source (default wikitext2:train; 'none' = plain SVD)")
    p.add_argument("--calibration-samples", type=int, help="calibration sequences (default 32)")
    p.add_argument("--calibration-seq-len", type=int, help="tokens per calibration sequence (default 256)")
    p.add_argument("--damping", type=float, help="whitening damping, fraction of mean diag(XᵀX) (default 0.01)")
    p.add_argument("--tier-edge-fraction", type=float, help="tiered: protected blocks at each end (default 0.1)")
    p.add_argument("--tier-edge-weight", type=float, help="tiered: cut rate of edge blocks (default 0.5)")
    p.add_argument("--tier-gate-weight", type=float, help="tiered: cut rate of gate projections (default 0.7)")
    p.add_argument("--out", help="output directory: a compressed checkpoint that every stage loads")
    p.add_argument("--dense-out", help="also write the merged dense checkpoint (stock transformers) here")
    p.add_argument("--config", help="YAML file with sections model/prune (flags override it)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.set_defaults(func=cmd_prune)


def _layer_table(layers: list[dict]) -> str:
    lines = [f"{'matrix':<34} {'shape':>11} {'rank':>11} {'params':>19} {'energy':>7}"]
    for row in layers:
        rank = lambda r: "dense" if r is None else str(r)  # noqa: E731
        lines.append(f"{row['name'].removeprefix('model.'):<34} {'x'.join(map(str, row['shape'])):>11} "
                     f"{rank(row['rank_before']) + '→' + rank(row['rank_after']):>11} "
                     f"{str(row['params_before']) + '→' + str(row['params_after']):>19} {row['energy']:>7.4f}")
    return "\n".join(lines)


def cmd_prune(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from tqdm.auto import tqdm

    from sparsekd_core.config import PruneConfig
    from sparsekd_core.models import load_model, weights_digest
    from sparsekd_core.prune import count_params, find_mlp_matrices, prune_model, save_compressed, save_dense

    sections = _sections(args, PRUNE_FLAGS)
    if "model" not in sections["model"]:
        raise ConfigError("model.model: required; give --model (e.g. --model smollm2-135m)")
    if not args.out:
        raise ConfigError("prune: --out DIR is required (where the pruned checkpoint is written)")
    targets = sections["prune"].pop("target_reduction", None)
    targets = targets if isinstance(targets, list) or targets is None else [targets]
    if targets and any(b <= a for a, b in zip(targets, targets[1:])):
        raise ConfigError(f"prune.target_reduction={targets}: successive rounds must increase")
    model_cfg = build(ModelConfig, "model", sections["model"])
    configs = [build(PruneConfig, "prune", {**sections["prune"], "target_reduction": t}) for t in targets or [None]]
    out = Path(args.out).expanduser()
    if out.resolve() == Path(model_cfg.model).expanduser().resolve():
        raise ConfigError(f"prune: --out {args.out!r} is the input model; write the next round elsewhere")

    loaded = load_model(model_cfg, log=log)
    parent = f"{model_cfg.model} (weights {weights_digest(loaded.model)})"
    reports = []
    for cfg in configs:
        with tqdm(total=len(find_mlp_matrices(loaded.model)), desc=f"prune {cfg.method}", unit="matrix",
                  file=sys.stderr, disable=None) as bar:
            reports.append(prune_model(loaded.model, loaded.tokenizer, cfg, parent=parent, log=log,
                                       progress=bar.update))
        parent = f"round {reports[-1].round} of this run"
    t0 = time.perf_counter()
    save_compressed(loaded.model, loaded.tokenizer, out)
    if args.dense_out:
        save_dense(loaded.model, loaded.tokenizer, Path(args.dense_out).expanduser())
    save_seconds = time.perf_counter() - t0

    result = reports[-1].summary()
    if len(reports) > 1:  # several rounds in one call: totals span all of them
        first = reports[0].summary()
        for key in ("mlp_params_before", "total_params_before"):
            result[key] = first[key]
        result["seconds"] = sum(r.seconds for r in reports)
        result["rounds"] = [{k: v for k, v in r.summary().items() if k != "layers"} for r in reports]
    saved = count_params(loaded.model)
    result.update(out=str(out), dense_out=args.dense_out, save_seconds=save_seconds,
                  weights_bytes=(out / "model.safetensors").stat().st_size, saved_total_params=saved["total"],
                  model=model_cfg.model, device=loaded.device.type, dtype=str(loaded.dtype).removeprefix("torch."))
    unit = "nonzero " if reports[-1].unstructured else ""
    human = (f"{_layer_table(result['layers'])}\n"
             f"{reports[-1].method}: MLP {unit}params {result['mlp_params_before']:,} → {result['mlp_params_after']:,} "
             f"(reduction {result['mlp_reduction']:.4f} of the dense MLP), total {result['total_params_before']:,} "
             f"→ {result['total_params_after']:,}; {result['seconds']:.1f}s; saved {out}")
    _emit(result, args.json, human)
    return 0


# ---------------------------------------------------------------------------------------------------------------- main

VERBS: list[Callable] = [add_eval_parser, add_prune_parser]


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparsekd", description="Structured SVD pruning + self-referential KD, as experiments.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    for add in VERBS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from sparsekd_core.data import DataQualityError, DataUnavailableError
    from sparsekd_core.models import ModelLoadError

    parser = make_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return EXIT_BAD_INPUT
        return args.func(args)
    except (ConfigError, ModelLoadError, DataQualityError, DataUnavailableError) as err:
        print(f"sparsekd: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("sparsekd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
