"""`sparsekd <verb>`: a table from verb to the function that runs it (stage verbs call sparsekd_core).

Every verb takes ``--json`` and then prints one JSON object as its last stdout line; progress and logs go to
stderr. Bad input (a config value, a missing file, an unknown alias) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from sparsekd_core.config import ConfigError, DataConfig, EvalConfig, ModelConfig, ProfileConfig, build, load_yaml

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


def _configs(args: argparse.Namespace, flags: dict, verb: str, cls, required: tuple[str, ...] = (),
             model_flag: str = "--model") -> tuple[ModelConfig, Any]:
    """The model config and the verb's stage config from flags and --config, with the required fields checked
    first (one line each, exit 2)."""
    sections = _sections(args, flags)
    if "model" not in sections["model"]:
        raise ConfigError(f"model.model: required; give {model_flag} (e.g. {model_flag} smollm2-135m)")
    for field in required:
        if field not in sections[verb]:
            raise ConfigError(f"{verb}.{field}: required; give --{field.replace('_', '-')}")
    return build(ModelConfig, "model", sections["model"]), build(cls, verb, sections[verb])


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
    p.add_argument("--dtype", help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32; "
                   "cache, prune, distill and sft load fp32 whatever it says (precision.py)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
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
    p.add_argument("--batch-size", type=int, help="windows (perplexity) or problems (gsm8k) per forward pass")
    p.add_argument("--kind", choices=["perplexity", "gsm8k", "lm-eval"], default="perplexity",
                   help="perplexity (default) | gsm8k: exact-match accuracy by greedy generation on --data "
                        "(default gsm8k:test) and the reference solutions' log-likelihood | lm-eval: "
                        "lm-evaluation-harness tasks (--tasks) on the model as sparsekd loads it")
    p.add_argument("--tasks", help="lm-eval: comma-separated task names (default wikitext2_sparsekd, a local task "
                                   "on the packaged WikiText-2 test split; any lm-eval task online)")
    p.add_argument("--include", help="lm-eval: a directory of your own task YAML files")
    p.add_argument("--limit", type=int, help="lm-eval: at most N documents per task")
    p.add_argument("--max-problems", type=int, help="gsm8k: the first N problems (default 100)")
    p.add_argument("--max-new-tokens", type=int, help="gsm8k: greedy decode budget per problem (default 256)")
    p.add_argument("--config", help="YAML file with sections model/data/eval (flags override it)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.set_defaults(func=cmd_eval)


ACCURACY_FLAGS = {
    "model": EVAL_FLAGS["model"],
    "accuracy": {"max_problems": "max_problems", "max_new_tokens": "max_new_tokens", "batch_size": "batch_size"},
}


def cmd_eval_gsm8k(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from sparsekd_core.config import AccuracyConfig, check_data_spec
    from sparsekd_core.data import gsm8k_records
    from sparsekd_core.downstream import gsm8k_accuracy
    from sparsekd_core.models import load_model

    sections = _sections(args, ACCURACY_FLAGS)
    if "model" not in sections["model"]:
        raise ConfigError("model.model: required; give --model (e.g. --model smollm2-135m)")
    model_cfg = build(ModelConfig, "model", sections["model"])
    acc_cfg = build(AccuracyConfig, "accuracy", sections["accuracy"])
    data = args.data or "gsm8k:test"
    try:
        check_data_spec(data)
    except ValueError as err:
        raise ConfigError(f"data.data={data!r}: {err}") from None
    records = gsm8k_records(data)[: acc_cfg.max_problems]
    loaded = load_model(model_cfg, log=log)
    log(f"eval gsm8k: {len(records)} problems of {data!r}, greedy, up to {acc_cfg.max_new_tokens} new tokens")
    with tqdm(total=len(records), desc="gsm8k", unit="problem", file=sys.stderr, disable=None) as bar:
        res = gsm8k_accuracy(loaded.model, loaded.tokenizer, records, acc_cfg.max_new_tokens, acc_cfg.batch_size,
                             progress=bar.update)
    result = res.as_dict() | {"kind": "gsm8k", "model": model_cfg.model, "data": data,
                              "max_new_tokens": acc_cfg.max_new_tokens, "device": loaded.device.type,
                              "dtype": str(loaded.dtype).removeprefix("torch.")}
    _emit(result, args.json, f"gsm8k accuracy {res.accuracy:.4f} ({res.correct}/{res.problems}, {res.no_answer} "
          f"without a number), reference log-likelihood {res.reference_loglik:.4f} nats/token, {res.seconds:.0f}s")
    return 0


def cmd_eval_lm_eval(args: argparse.Namespace) -> int:
    from sparsekd_core.harness import LOCAL_TASK, run_lm_eval
    from sparsekd_core.models import load_model

    sections = _sections(args, {"model": EVAL_FLAGS["model"]})
    if "model" not in sections["model"]:
        raise ConfigError("model.model: required; give --model (e.g. --model smollm2-135m)")
    if args.limit is not None and args.limit <= 0:
        raise ConfigError(f"eval.limit={args.limit}: allowed: a positive number of documents")
    model_cfg = build(ModelConfig, "model", sections["model"])
    tasks = [t.strip() for t in (args.tasks or LOCAL_TASK).split(",") if t.strip()]
    loaded = load_model(model_cfg, log=log)
    log(f"eval lm-eval: tasks {', '.join(tasks)} on {model_cfg.model} (as sparsekd loads it)")
    try:
        results = run_lm_eval(loaded.model, loaded.tokenizer, tasks, include=args.include, limit=args.limit,
                              batch_size=args.batch_size or 1)
    except (KeyError, ValueError) as err:  # lm-eval's way of saying "no such task"
        raise ConfigError(f"eval.tasks={args.tasks!r}: {str(err).splitlines()[0]}") from None
    result = {"kind": "lm-eval", "model": model_cfg.model, "tasks": tasks, "results": results,
              "device": loaded.device.type, "dtype": str(loaded.dtype).removeprefix("torch.")}
    human = "\n".join(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                               if isinstance(v, (int, float)))
                      for task, metrics in results.items())
    _emit(result, args.json, human)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.kind == "gsm8k":
        return cmd_eval_gsm8k(args)
    if args.kind == "lm-eval":
        return cmd_eval_lm_eval(args)
    if args.tasks or args.include or args.limit is not None:
        raise ConfigError("eval: --tasks, --include and --limit apply to --kind lm-eval only")
    if args.max_problems is not None or args.max_new_tokens is not None:
        raise ConfigError("eval: --max-problems and --max-new-tokens apply to --kind gsm8k only")
    from tqdm.auto import tqdm

    from sparsekd_core.data import load_text
    from sparsekd_core.eval import make_windows, perplexity, tokenize_text
    from sparsekd_core.models import load_model
    from sparsekd_core.prune.masks import measured_compression

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
        "precision": res.precision,  # evaluation may run in bf16 (a measurement); this says which
        # Counted on the evaluated model (e.g. the zeros of a WANDA model after distillation).
        **{k: v for k, v in measured_compression(loaded.model).items() if k != "counted"},
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
              "tier_edge_weight": "tier_edge_weight", "tier_gate_weight": "tier_gate_weight",
              "drop_blocks": "drop_blocks"},
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
    p.add_argument("--method", help="svd (structured low-rank, default) | wanda (unstructured) | depth (remove "
                                    "whole decoder blocks)")
    p.add_argument("--drop-blocks", type=int, metavar="N",
                   help="depth: remove the N consecutive blocks with the smallest angular distance")
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


def _distance_table(result: dict) -> str:
    """Depth pruning: the angular distance of every span of drop_blocks blocks, the dropped one marked."""
    lines = [f"{'blocks':>10} {'angular distance':>17}"]
    for row in result.get("distance_curve", []):
        mark = "  <- dropped" if row["start"] == result["dropped_blocks"][0] else ""
        lines.append(f"{row['blocks']:>10} {row['distance']:>17.4f}{mark}")
    lines.append(f"blocks {result['num_layers_before']} → {result['num_layers_after']}")
    return "\n".join(lines)


def cmd_prune(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from tqdm.auto import tqdm

    from sparsekd_core.config import PruneConfig
    from sparsekd_core.models import load_for, weights_digest
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

    loaded = load_for("prune", model_cfg, log=log)  # fp32 whatever --dtype says (precision.py)
    parent = f"{model_cfg.model} (weights {weights_digest(loaded.model)})"
    reports = []
    for cfg in configs:
        total, unit = ((cfg.calibration_samples, "seq") if cfg.method == "depth"
                       else (len(find_mlp_matrices(loaded.model)), "matrix"))
        with tqdm(total=total, desc=f"prune {cfg.method}", unit=unit, file=sys.stderr, disable=None) as bar:
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
    table = _layer_table(result["layers"]) if result["layers"] else _distance_table(result)
    human = (f"{table}\n"
             f"{reports[-1].method}: MLP {unit}params {result['mlp_params_before']:,} → {result['mlp_params_after']:,} "
             f"(reduction {result['mlp_reduction']:.4f} of the dense MLP), total {result['total_params_before']:,} "
             f"→ {result['total_params_after']:,}; {result['seconds']:.1f}s; saved {out}")
    _emit(result, args.json, human)
    return 0


# ---------------------------------------------------------------------------------------------------------------- profile


def _int_list(flag: str):
    def parse(text: str) -> list[int]:
        try:
            return [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes comma-separated integers, got {text!r}") from None

    return parse


def add_profile_parser(sub) -> None:
    p = sub.add_parser("profile", help="TTFT/TPOT, memory and attention-vs-FFN time, models side by side")
    p.add_argument("--model", dest="models", action="append", help="model to profile (repeat; the first is the baseline)")
    p.add_argument("--dtype", help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32; "
                   "cache, prune, distill and sft load fp32 whatever it says (precision.py)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-sizes", type=_int_list("--batch-sizes"), help="comma-separated (default 1,16,64)")
    p.add_argument("--seq-len", type=_int_list("--seq-len"), help="comma-separated prompt lengths (default 128)")
    p.add_argument("--new-tokens", type=int, help="decode steps timed per run (default 32)")
    p.add_argument("--warmup", type=int, help="untimed runs before timing (default 1)")
    p.add_argument("--repeats", type=int, help="timed runs per cell (default 3)")
    p.add_argument("--out", help="directory for profile.json, profile.md and speedup.png")
    p.add_argument("--config", help="YAML file with a `profile` section (flags override it)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.set_defaults(func=cmd_profile)


PROFILE_FLAGS = {"profile": {"batch_sizes": "batch_sizes", "seq_len": "seq_len", "new_tokens": "new_tokens",
                             "warmup": "warmup", "repeats": "repeats"}}


def cmd_profile(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sparsekd_core.files import write_json_atomic, write_text_atomic
    from sparsekd_core.models import load_model
    from sparsekd_core.profile import add_speedups, markdown_table, profile_model, speedup_plot

    if not args.models:
        raise ConfigError("profile: give at least one --model (the first is the baseline for speedups)")
    prof_cfg = build(ProfileConfig, "profile", _sections(args, PROFILE_FLAGS)["profile"])
    model_cfgs = [build(ModelConfig, "model", {k: v for k, v in {"model": m, "dtype": args.dtype,
                  "device": args.device}.items() if v is not None}) for m in args.models]
    results: list[dict] = []
    for index, cfg in enumerate(model_cfgs):  # one model in memory at a time
        loaded = load_model(cfg, log=log)
        log(f"profile: {cfg.model} on {loaded.device.type} {str(loaded.dtype).removeprefix('torch.')}")
        results += profile_model(cfg.model, loaded.model, prof_cfg, index, progress=lambda r: log(
            f"  batch {r['batch_size']:>3} seq {r['seq_len']:>4}: TTFT {r['ttft_ms']:.1f} ms, TPOT {r['tpot_ms']:.2f} ms, "
            f"attention {r['attention_ms']:.1f} ms, FFN {r['ffn_ms']:.1f} ms"))
        del loaded
    add_speedups(results)
    table = markdown_table(results)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "profile.json", {"results": results})
        write_text_atomic(out / "profile.md", table)
        speedup_plot(results, out / "speedup.png")
        log(f"profile: wrote {out}/profile.json, profile.md, speedup.png")
    _emit({"results": results}, args.json, table)
    return 0


# ---------------------------------------------------------------------------------------------------------------- cache

CACHE_FLAGS = {
    "model": EVAL_FLAGS["model"],
    "cache": {"out": "out", "data": "data", "num_samples": "num_samples", "seq_len": "seq_len", "seed": "seed",
              "max_sequences_per_document": "max_sequences_per_document", "top_k": "top_k", "format": "format", "logprob_step": "logprob_step",
              "teacher_sample": "teacher_sample", "sample_temperature": "sample_temperature",
              "batch_size": "batch_size", "chunk_size": "chunk_size", "shard_index": "shard_index",
              "num_shards": "num_shards", "teacher_precision": "teacher_precision"},
}


def _shard(text: str) -> tuple[int, int]:
    """``I/N`` (0-based I) -> (I, N), for --shard."""
    try:
        index, shards = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N (e.g. 0/2: the first of two shards)") from None
    if not 0 <= index < shards:
        raise argparse.ArgumentTypeError(f"{text!r}: I must be 0..N-1 (e.g. 0/2 and 1/2 for two shards)")
    return index, shards


def add_cache_parser(sub) -> None:
    p = sub.add_parser("cache", help="cache the model's top-k next-token distribution over a corpus (Zarr v3)")
    _add_model_flags(p)
    p.add_argument("--data", help="mixture (mix:paper-offline, default), named source or local file")
    p.add_argument("--out", help="Zarr store: local directory or fsspec URL (s3://...)")
    p.add_argument("--num-samples", type=int, help="sequences (required for a mixture)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 512)")
    p.add_argument("--seed", type=int, help="corpus seed: document order and offsets (default 0)")
    p.add_argument("--max-sequences-per-document", type=int,
                   help="sequences one document may give (default 1: a sample is a document)")
    p.add_argument("--top-k", type=int, help="ids kept per position (default 32)")
    p.add_argument("--format", type=int, choices=(1, 2),
                   help="top-k store format: 2 (default; log-probs in steps below the top-1) or 1 (fp16 log-probs)")
    p.add_argument("--logprob-step", type=float, help="format 2: log-prob step in nats (default 0.02)")
    p.add_argument("--teacher-sample", type=int, metavar="N",
                   help="store N classes sampled per position from the teacher (unbiased KD; distill --tail sampled) "
                        "instead of the top-k")
    p.add_argument("--sample-temperature", type=float, help="temperature the classes are sampled at (default 2.0; "
                                                            "= the distillation temperature)")
    p.add_argument("--batch-size", type=int, help="sequences per forward pass (divides --chunk-size; default 1 on "
                                                  "CPU, a GPU-filling divisor on CUDA; the bytes are batch 1's)")
    p.add_argument("--chunk-size", type=int, help="sequences per Zarr chunk (default 16)")
    p.add_argument("--teacher-precision", choices=("fp32", "tf32", "bf16"),
                   help="the teacher's forward: fp32 (default, whatever --dtype says: fp32 weights and math) | tf32 "
                        "(TF32 matmuls on CUDA) | bf16 (bf16 weights); an opt-in's error vs fp32 is in the JSON")
    p.add_argument("--shard", type=_shard, metavar="I/N",
                   help="write shard I (0-based) of N: a disjoint chunk range of the same --out, for N processes "
                        "or hosts at once; the store is complete when every shard has finished")
    p.add_argument("--config", help="YAML file with sections model/cache (flags override it)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.set_defaults(func=cmd_cache)


def _progress(desc: str, unit: str):
    from tqdm.auto import tqdm

    return lambda total: tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None)


def cmd_cache(args: argparse.Namespace) -> int:
    from sparsekd_core.cache import run_cache
    from sparsekd_core.config import CacheConfig
    from sparsekd_core.models import load_for

    if args.shard is not None:
        args.shard_index, args.num_shards = args.shard
    model_cfg, cache_cfg = _configs(args, CACHE_FLAGS, "cache", CacheConfig, ("out",))
    loaded = load_for("teacher", model_cfg, log=log)  # fp32 whatever --dtype says (precision.py)
    desc = "cache" if cache_cfg.num_shards == 1 else f"cache {cache_cfg.shard_index}/{cache_cfg.num_shards}"
    res = run_cache(loaded, cache_cfg, log=log, progress_factory=_progress(desc, "seq"))
    result = res.as_dict() | {"model": model_cfg.model, "data": cache_cfg.data, "device": loaded.device.type,
                              "dtype": str(loaded.dtype).removeprefix("torch.")}
    size = (f"{res.bytes_per_token:.1f} bytes/token" if res.complete
            else f"store {res.chunks_done}/{res.chunks} chunks done (other shards pending)")
    _emit(result, args.json, f"cache {res.path}: {res.sequences} sequences from {res.documents} documents, "
          f"{res.tokens} tokens, " + (f"top-{res.top_k}" if res.top_k else f"{res.teacher_sample} sampled classes")
          + f", {size}, {res.tokens_per_s:.0f} tokens/s, "
          f"{res.resumed_chunks} chunks resumed")
    return 0


# ---------------------------------------------------------------------------------------------------------------- distill

TRAIN_OPTIONS = {  # flag dest -> (type, help); the field of the same name in TrainConfig (distill and sft)
    "out": (str, "output directory (HF-loadable student, checkpoint/, the run's JSON)"),
    "lr": (float, "peak learning rate (default 2e-5)"),
    "min_lr_ratio": (float, "cosine decay floor as a fraction of lr (default 0.1)"),
    "warmup_steps": (int, "linear warmup steps (default 5%% of the steps)"),
    "weight_decay": (float, "AdamW weight decay (default 0)"),
    "grad_clip": (float, "gradient-norm clip (default 1.0; 0 = off)"),
    "batch_size": (int, "sequences per micro-step (default 1)"),
    "grad_accum": (int, "micro-steps per optimizer step (default 1)"),
    "epochs": (int, "passes over the training data (default 1)"),
    "max_steps": (int, "stop after N optimizer steps"),
    "seed": (int, "seed for data order and RNG (default 0)"),
    "eval_every": (int, "validation every N steps (default 50; also at start and end)"),
    "val_data": (str, "held-out validation text (default wikitext2:valid; never wikitext2:test)"),
    "val_tokens": (int, "validation tokens (default 2048)"),
    "val_ctx": (int, "validation window (default 256)"),
    "patience": (int, "stopping rule: evaluations without a min-delta gain (default 3)"),
    "min_delta": (float, "stopping rule: relative ppl gain that counts (default 0.002)"),
    "checkpoint_every": (int, "also a resumable checkpoint every N steps (default: none, by time only)"),
    "checkpoint_minutes": (float, "resumable checkpoint every M minutes of wall time (default 10; 0 = off)"),
    "max_bad_steps": (int, "abort after N NaN/inf steps in a row (default 5)"),
    "autocast": (str, "auto (bf16 autocast on CUDA, none on CPU) | bf16 | off; weights are always fp32"),
    "parallel": (str, "under torchrun: auto (= ddp) | ddp | fsdp; --batch-size is the global micro-batch"),
}
DISTILL_OPTIONS = {  # the fields DistillConfig adds
    "cache": (str, "teacher cache written by `sparsekd cache` (any model with the student's tokenizer)"),
    "alpha": (float, "KD weight (default 0.5; 0 = CE-only control)"),
    "temperature": (float, "KD temperature T (default 2.0)"),
    "tail": (str, "topk (default) | bucket | paper: mass outside the cached top-k; sampled: a --teacher-sample cache"),
    **TRAIN_OPTIONS,
}
SFT_OPTIONS = {  # the fields SFTConfig adds
    "data": (str, "a .jsonl of prompt/response records (e.g. `sparsekd selfdata` output), or gsm8k:train"),
    "num_samples": (int, "the first N records (default: all)"),
    "max_len": (int, "prompt + response tokens per example (default 512)"),
    **TRAIN_OPTIONS,
}
DISTILL_FLAGS = {"model": EVAL_FLAGS["model"], "distill": {name: name for name in DISTILL_OPTIONS}}
SFT_FLAGS = {"model": EVAL_FLAGS["model"], "sft": {name: name for name in SFT_OPTIONS}}


def _add_train_parser(sub, verb: str, help_text: str, options: dict, func) -> None:
    p = sub.add_parser(verb, help=help_text)
    _add_model_flags(p, "--student")
    for name, (kind, help_line) in options.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, help=help_line)
    p.add_argument("--config", help=f"YAML file with sections model/{verb} (flags override it)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.set_defaults(func=func)


def add_distill_parser(sub) -> None:
    _add_train_parser(sub, "distill", "train a student on a teacher cache (offline self-referential KD)",
                      DISTILL_OPTIONS, cmd_distill)


def add_sft_parser(sub) -> None:
    _add_train_parser(sub, "sft", "supervised fine-tuning on prompt/response pairs (loss on the response only)",
                      SFT_OPTIONS, cmd_sft)


def _train(args: argparse.Namespace, verb: str, flags: dict, config_cls, required: tuple[str, ...], run) -> tuple:
    """Shared by distill and sft: configs, the student under the precision policy, a progress bar, the run.
    Under torchrun every rank runs this; the run's core logs and reports progress on rank 0 only."""
    from tqdm.auto import tqdm

    from sparsekd_core import dist
    from sparsekd_core.models import load_for

    model_cfg, cfg = _configs(args, flags, verb, config_cls, required, model_flag="--student")
    dist.bind_cuda_device()  # under torchrun each rank loads onto its own GPU
    loaded = load_for("train", model_cfg, log=log if dist.rank() == 0 else lambda m: None)  # fp32 master weights
    bar = None

    def progress(step: int, total: int, postfix: dict) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, initial=step - 1, desc=verb, unit="step", file=sys.stderr, disable=None)
        bar.update(1)
        bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    try:
        res = run(cfg, loaded.model, loaded.tokenizer, student_spec=model_cfg.model, log=log, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    return cfg, model_cfg, res


def _train_summary(verb: str, res) -> str:
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    return (f"{verb}: {res.steps} steps -> {res.out}: kd {fmt(res.kd_loss_first)} -> {fmt(res.kd_loss_last)}, ce "
            f"{fmt(res.ce_loss_first)} -> {fmt(res.ce_loss_last)}, best val ppl {fmt(res.val_ppl_best)} (step "
            f"{res.best_step}; start {fmt(res.val_ppl_start)}), {res.tokens_per_s:.0f} tokens/s, stop: "
            f"{res.stop_reason}; {res.precision}; MLP {res.mlp_nonzero:,} nonzero of {res.mlp_params:,} "
            f"({res.mlp_zero_fraction:.2%} zero)")


def cmd_distill(args: argparse.Namespace) -> int:
    from sparsekd_core.config import DistillConfig
    from sparsekd_core.dist import rank
    from sparsekd_core.distill import distill

    cfg, model_cfg, res = _train(args, "distill", DISTILL_FLAGS, DistillConfig, ("cache", "out"), distill)
    result = res.as_dict() | {"student": model_cfg.model, "cache": cfg.cache, "alpha": cfg.alpha,
                              "temperature": cfg.temperature, "tail": cfg.tail}
    if rank() == 0:  # under torchrun: one JSON line for the run, not one per rank
        _emit(result, args.json, _train_summary("distilled", res))
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from sparsekd_core.config import SFTConfig
    from sparsekd_core.dist import rank
    from sparsekd_core.sft import sft

    cfg, model_cfg, res = _train(args, "sft", SFT_FLAGS, SFTConfig, ("data", "out"), sft)
    if rank() == 0:
        _emit(res.as_dict() | {"student": model_cfg.model, "data": cfg.data}, args.json, _train_summary("sft", res))
    return 0


# ---------------------------------------------------------------------------------------------------------------- selfdata

SELFDATA_FLAGS = {
    "model": EVAL_FLAGS["model"],
    "selfdata": {name: name for name in ("out", "data", "num_samples", "max_new_tokens", "batch_size", "chunk_size",
                                         "sampling", "temperature", "top_p", "seed", "filter_answers")},
}


def add_selfdata_parser(sub) -> None:
    p = sub.add_parser("selfdata", help="the unpruned model rewrites an instruction dataset's responses (resumable)")
    _add_model_flags(p)
    p.add_argument("--data", help="gsm8k:train (default), hub:gsm8k:train or a .jsonl of prompt/response records")
    p.add_argument("--out", help="output .jsonl of {prompt, response} (the SFT stage reads it)")
    p.add_argument("--num-samples", type=int, help="the first N records (default: all)")
    p.add_argument("--max-new-tokens", type=int, help="generation budget per rewrite (default 256)")
    p.add_argument("--batch-size", type=int, help="records per generate() call (default 8; divides --chunk-size)")
    p.add_argument("--chunk-size", type=int, help="records per committed chunk (default 16)")
    p.add_argument("--sampling", help="greedy (default) | sample")
    p.add_argument("--temperature", type=float, help="sampling temperature (default 0.7)")
    p.add_argument("--top-p", type=float, help="nucleus mass (default 0.95)")
    p.add_argument("--seed", type=int, help="sampling seed (default 0)")
    p.add_argument("--filter-answers", action=argparse.BooleanOptionalAction, default=None,
                   help="GSM8K: keep a rewrite only if its final number equals the reference's (default on)")
    p.add_argument("--config", help="YAML file with sections model/selfdata (flags override it)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.set_defaults(func=cmd_selfdata)


def cmd_selfdata(args: argparse.Namespace) -> int:
    from sparsekd_core.config import SelfDataConfig
    from sparsekd_core.models import load_model
    from sparsekd_core.selfdata import instruction_records, run_selfdata

    model_cfg, cfg = _configs(args, SELFDATA_FLAGS, "selfdata", SelfDataConfig, ("out",))
    total = len(instruction_records(cfg.data, cfg.num_samples)[0])
    loaded = load_model(model_cfg, log=log)
    bar = _progress("selfdata", "record")(total)
    try:
        res = run_selfdata(loaded, cfg, log=log, progress=bar.update)
    finally:
        bar.close()
    _emit(res.as_dict() | {"model": model_cfg.model, "data": cfg.data}, args.json,
          f"selfdata {res.out}: kept {res.kept} of {res.records} rewrites ({res.dropped} dropped, {res.no_answer} "
          f"without a number), {res.generated_tokens} tokens at {res.tokens_per_s:.0f} tokens/s, "
          f"{res.resumed_chunks} chunks resumed")
    return 0


# ---------------------------------------------------------------------------------------------------------------- run / demo

DEMO_CONFIG = {
    # Sized for ~15 minutes on 2 CPU cores: a 64×256-token offline mixture, 16 distillation steps per arm
    # (24 steps took 19.9 min in all; validation PPL had made most of its gain by step 16), 3072-token
    # evaluations on WikiText-2 test (in-domain) and held-out C4 (out-of-domain).
    "model": "smollm2-135m",
    "workdir": "runs/demo",
    "corpus": {"data": "mix:paper-offline", "num_samples": 64, "seq_len": 256, "seed": 0, "top_k": 32},
    "distill": {"max_steps": 16, "lr": 5e-5, "batch_size": 2, "eval_every": 8, "val_tokens": 1024,
                "checkpoint_every": 8},
    "eval_sets": [{"name": "wikitext2", "data": "wikitext2:test", "max_tokens": 3072},
                  {"name": "c4_heldout", "data": "c4:heldout", "max_tokens": 3072}],
    "target": 0.15,
}


def add_run_parser(sub) -> None:
    p = sub.add_parser("run", help="run an experiment flow (dense-kd, iterative, multi-seed, cascade, ...)")
    p.add_argument("flow", help="dense-kd | iterative | multi-seed | cascade | teacher-swap | wanda | selfdata | "
                                 "paper | profile | study")
    p.add_argument("--config", help="the flow's YAML config (see flows/configs/)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.set_defaults(func=cmd_run)


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="the main job: the cascade flow on the packaged SmolLM2-135M, offline")
    p.add_argument("--workdir", help="where caches, checkpoints, reports and mlflow.db go (default runs/demo)")
    p.add_argument("--model", help="model (default smollm2-135m; hub ids work online)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.set_defaults(func=cmd_demo)


def _run_flow(flow_name: str, values: dict, as_json: bool) -> int:
    import os

    from pydantic import ValidationError

    # The temporary local server otherwise tries to send telemetry (and logs an error when offline).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    from flows.configs import FLOW_CONFIGS
    from sparsekd_core.config import format_validation_error

    if flow_name not in FLOW_CONFIGS:
        raise ConfigError(f"run: unknown flow {flow_name!r}; allowed: {', '.join(FLOW_CONFIGS)}")
    try:
        config = FLOW_CONFIGS[flow_name](**values)
    except ValidationError as err:  # before any work starts
        raise ConfigError(format_validation_error(flow_name, err)) from None
    from flows.registry import ALL_FLOWS

    summary = ALL_FLOWS[flow_name](config)
    db = summary["tracking_uri"]
    ran = sum(not s["cached"] for s in summary["stages"])
    human = (f"\n{flow_name}: done ({ran} stages ran, {len(summary['stages']) - ran} reused from cache)\n"
             f"report:    {summary['report']}\n"
             f"MLflow UI: mlflow ui --backend-store-uri {db} --host 127.0.0.1 --port 5000   (then http://127.0.0.1:5000)\n"
             f"Prefect UI: prefect server start --host 127.0.0.1   (then http://127.0.0.1:4200)")
    _emit(summary, as_json, human)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    values = load_yaml(args.config) if args.config else {}
    return _run_flow(args.flow, values, args.json)


def cmd_demo(args: argparse.Namespace) -> int:
    values = dict(DEMO_CONFIG)
    if args.workdir:
        values["workdir"] = args.workdir
    if args.model:
        values["model"] = args.model
    return _run_flow("cascade", values, args.json)


# ---------------------------------------------------------------------------------------------------------------- main

VERBS: list[Callable] = [add_eval_parser, add_cache_parser, add_distill_parser, add_prune_parser, add_profile_parser,
                         add_selfdata_parser, add_sft_parser, add_run_parser, add_demo_parser]


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
