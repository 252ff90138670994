"""`sparsekd selfdata`: the unpruned model rewrites an instruction dataset's responses (resumable)."""

from __future__ import annotations

import argparse

from sparsekd_core.config import SelfDataConfig

from ._common import MODEL, add_output_flags, config_help, configs, emit, log, progress
from ._flags import Section, add_section_flags

SELFDATA = Section("selfdata", SelfDataConfig)


def add_selfdata_parser(sub) -> None:
    p = sub.add_parser("selfdata", help="the unpruned model rewrites an instruction dataset's responses (resumable)")
    add_section_flags(p, (MODEL, SELFDATA))
    add_output_flags(p, config_help((MODEL, SELFDATA)))
    p.set_defaults(func=cmd_selfdata)


def cmd_selfdata(args: argparse.Namespace) -> int:
    from sparsekd_core.models import load_model
    from sparsekd_core.selfdata import instruction_records, run_selfdata

    model_cfg, cfg = configs(args, SELFDATA, ("out",))
    total = len(instruction_records(cfg.data, cfg.num_samples)[0])
    loaded = load_model(model_cfg, log=log)
    bar = progress("selfdata", "record")(total)
    try:
        res = run_selfdata(loaded, cfg, log=log, progress=bar.update)
    finally:
        bar.close()
    emit(res.as_dict() | {"model": model_cfg.model, "data": cfg.data}, args.json,
         f"selfdata {res.out}: kept {res.kept} of {res.records} rewrites ({res.dropped} dropped, {res.no_answer} "
         f"without a number), {res.generated_tokens} tokens at {res.tokens_per_s:.0f} tokens/s, "
         f"{res.resumed_chunks} chunks resumed")
    return 0
