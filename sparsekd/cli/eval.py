"""`sparsekd eval`: sliding-window perplexity (paper or standard protocol), GSM8K accuracy, or lm-eval tasks."""

from __future__ import annotations

import argparse

from sparsekd_core.config import AccuracyConfig, ConfigError, DataConfig, EvalConfig, ModelConfig, build
from sparsekd_core.harness import LOCAL_TASK

from ._common import MODEL, add_output_flags, dtype_name, emit, log, progress, require_model, sections
from ._flags import Flag, Section, add_section_flags, section_names

DATA = Section("data", DataConfig)
EVAL = Section("eval", EvalConfig)
ACCURACY = Section("accuracy", AccuracyConfig, label="gsm8k")
KIND_SECTIONS = {"perplexity": (MODEL, DATA, EVAL), "gsm8k": (MODEL, ACCURACY), "lm-eval": (MODEL,)}
DEFAULT_DATA = {"perplexity": "wikitext2:test", "gsm8k": "gsm8k:test"}
LM_EVAL_BATCH_SIZE = 1  # lm-eval's own default


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="sliding-window perplexity (paper or standard protocol)")
    add_section_flags(p, (MODEL, DATA, EVAL, ACCURACY), overrides={
        "data": Flag(note=f" (default {DEFAULT_DATA['perplexity']}; --kind gsm8k: {DEFAULT_DATA['gsm8k']})"),
        "batch_size": Flag(note=f"; lm-eval: the harness's batch size (default {LM_EVAL_BATCH_SIZE})"),
    })
    p.add_argument("--kind", choices=list(KIND_SECTIONS), default="perplexity",
                   help="perplexity (default) | gsm8k: exact-match accuracy by greedy generation on --data and the "
                        "reference solutions' log-likelihood | lm-eval: lm-evaluation-harness tasks (--tasks) on the "
                        "model as sparsekd loads it")
    p.add_argument("--tasks", help=f"lm-eval: comma-separated task names (default {LOCAL_TASK}, a local task on the "
                                   "packaged WikiText-2 test split; any lm-eval task online)")
    p.add_argument("--include", help="lm-eval: a directory of your own task YAML files")
    p.add_argument("--limit", type=int, help="lm-eval: at most N documents per task")
    add_output_flags(p, f"YAML file with sections {section_names(KIND_SECTIONS['perplexity'])} (--kind gsm8k: "
                        f"{section_names(KIND_SECTIONS['gsm8k'])}; flags override it)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    if args.kind == "gsm8k":
        return cmd_eval_gsm8k(args)
    if args.kind == "lm-eval":
        return cmd_eval_lm_eval(args)
    if args.tasks or args.include or args.limit is not None:
        raise ConfigError("eval: --tasks, --include and --limit apply to --kind lm-eval only")
    if args.max_problems is not None or args.max_new_tokens is not None:
        raise ConfigError("eval: --max-problems and --max-new-tokens apply to --kind gsm8k only")
    from sparsekd_core.data import load_text
    from sparsekd_core.models import load_model
    from sparsekd_core.prune.masks import measured_compression
    from sparsekd_core.stages import evaluate_text

    values = sections(args, KIND_SECTIONS["perplexity"])
    values["data"].setdefault("data", DEFAULT_DATA["perplexity"])
    require_model(values)
    model_cfg = build(ModelConfig, "model", values["model"])
    data_cfg = build(DataConfig, "data", values["data"])
    eval_cfg = build(EvalConfig, "eval", values["eval"])

    loaded = load_model(model_cfg, log=log)
    try:
        res, text_tokens = evaluate_text(loaded, load_text(data_cfg.data), eval_cfg, data_cfg.max_tokens, log=log,
                                         progress_factory=progress("eval", "win"))
    except ConfigError as err:  # too short a text: name the field
        raise ConfigError(f"data.data={data_cfg.data!r}: {err}") from None
    result = {
        "ppl": res.ppl,
        "nll": res.nll,
        "tokens": res.tokens,
        "tokens_per_s": res.tokens_per_s,
        "protocol": eval_cfg.protocol,
        "ctx": eval_cfg.ctx,
        "stride": eval_cfg.stride,
        "windows": res.windows,
        "text_tokens": text_tokens,
        "seconds": res.seconds,
        "batch_size": eval_cfg.batch_size,
        "model": model_cfg.model,
        "data": data_cfg.data,
        "device": loaded.device.type,
        "dtype": dtype_name(loaded),
        "precision": res.precision,  # evaluation may run in bf16 (a measurement); this says which
        # Counted on the evaluated model (e.g. the zeros of a WANDA model after distillation).
        **{k: v for k, v in measured_compression(loaded.model).items() if k != "counted"},
    }
    emit(result, args.json, f"ppl {res.ppl:.4f} (nll {res.nll:.5f}) over {res.tokens} scored tokens, "
         f"{res.windows} windows, {res.tokens_per_s:.0f} tokens/s [{eval_cfg.protocol} protocol, "
         f"ctx {eval_cfg.ctx}, stride {eval_cfg.stride}]")
    return 0


def cmd_eval_gsm8k(args: argparse.Namespace) -> int:
    from sparsekd_core.config import check_data_spec
    from sparsekd_core.data import gsm8k_records
    from sparsekd_core.models import load_model
    from sparsekd_core.stages import evaluate_gsm8k

    values = sections(args, KIND_SECTIONS["gsm8k"])
    require_model(values)
    model_cfg = build(ModelConfig, "model", values["model"])
    acc_cfg = build(AccuracyConfig, "accuracy", values["accuracy"])
    data = args.data or DEFAULT_DATA["gsm8k"]
    try:
        check_data_spec(data)
    except ValueError as err:
        raise ConfigError(f"data.data={data!r}: {err}") from None
    records = gsm8k_records(data)[: acc_cfg.max_problems]
    loaded = load_model(model_cfg, log=log)
    log(f"eval gsm8k: {len(records)} problems of {data!r}, greedy, up to {acc_cfg.max_new_tokens} new tokens")
    res = evaluate_gsm8k(loaded, records, acc_cfg, progress_factory=progress("gsm8k", "problem"))
    result = res.as_dict() | {"kind": "gsm8k", "model": model_cfg.model, "data": data,
                              "max_new_tokens": acc_cfg.max_new_tokens, "device": loaded.device.type,
                              "dtype": dtype_name(loaded)}
    emit(result, args.json, f"gsm8k accuracy {res.accuracy:.4f} ({res.correct}/{res.problems}, {res.no_answer} "
         f"without a number), reference log-likelihood {res.reference_loglik:.4f} nats/token, {res.seconds:.0f}s")
    return 0


def cmd_eval_lm_eval(args: argparse.Namespace) -> int:
    from sparsekd_core.harness import run_lm_eval
    from sparsekd_core.models import load_model

    values = sections(args, KIND_SECTIONS["lm-eval"])
    require_model(values)
    if args.limit is not None and args.limit <= 0:
        raise ConfigError(f"eval.limit={args.limit}: allowed: a positive number of documents")
    model_cfg = build(ModelConfig, "model", values["model"])
    tasks = [t.strip() for t in (args.tasks or LOCAL_TASK).split(",") if t.strip()]
    loaded = load_model(model_cfg, log=log)
    log(f"eval lm-eval: tasks {', '.join(tasks)} on {model_cfg.model} (as sparsekd loads it)")
    try:
        results = run_lm_eval(loaded.model, loaded.tokenizer, tasks, include=args.include, limit=args.limit,
                              batch_size=args.batch_size or LM_EVAL_BATCH_SIZE)
    except (KeyError, ValueError) as err:  # lm-eval's way of saying "no such task"
        raise ConfigError(f"eval.tasks={args.tasks!r}: {str(err).splitlines()[0]}") from None
    result = {"kind": "lm-eval", "model": model_cfg.model, "tasks": tasks, "results": results,
              "device": loaded.device.type, "dtype": dtype_name(loaded)}
    human = "\n".join(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                               if isinstance(v, (int, float)))
                      for task, metrics in results.items())
    emit(result, args.json, human)
    return 0
