"""`sparsekd profile`: TTFT/TPOT, memory and attention-vs-FFN time of several models side by side."""

from __future__ import annotations

import argparse
import functools

from sparsekd_core.config import ConfigError, ModelConfig, ProfileConfig, build

from ._common import add_output_flags, emit, log, sections
from ._flags import Flag, Section, add_section_flags

MODELS = Section("model", ModelConfig, ("model", "dtype", "device"))  # read by cmd_profile: one config per --model
PROFILE = Section("profile", ProfileConfig, ("batch_sizes", "seq_len", "new_tokens", "warmup", "repeats"))


def add_profile_parser(sub) -> None:
    p = sub.add_parser("profile", help="TTFT/TPOT, memory and attention-vs-FFN time, models side by side")
    add_section_flags(p, (MODELS, PROFILE), overrides={
        "model": Flag(dest="models", action="append", note=" Repeat for several models; the first is the baseline."),
    })
    p.add_argument("--out", help="directory for profile.json, profile.md and speedup.png")
    add_output_flags(p, f"YAML file with a `{PROFILE.name}` section (flags override it)")
    p.set_defaults(func=cmd_profile)


def cmd_profile(args: argparse.Namespace) -> int:
    from sparsekd_core.models import load_model
    from sparsekd_core.profile import markdown_table
    from sparsekd_core.stages import profile_models, save_profile

    if not args.models:
        raise ConfigError("profile: give at least one --model (the first is the baseline for speedups)")
    prof_cfg = build(ProfileConfig, "profile", sections(args, (PROFILE,))["profile"])
    model_cfgs = [build(ModelConfig, "model", {k: v for k, v in {"model": m, "dtype": args.dtype,
                  "device": args.device}.items() if v is not None}) for m in args.models]
    results = profile_models([(cfg.model, functools.partial(load_model, cfg, log=log)) for cfg in model_cfgs],
                             prof_cfg, log=log)
    if args.out:
        table = save_profile(results, args.out)
        log(f"profile: wrote {args.out}/profile.json, profile.md, speedup.png")
    else:
        table = markdown_table(results)
    emit({"results": results}, args.json, table)
    return 0
