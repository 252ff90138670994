"""`sparsekd sft`: supervised fine-tuning on prompt/response pairs, loss on the response only (distill's loop)."""

from __future__ import annotations

import argparse

from sparsekd_core.config import SFTConfig, TrainConfig

from ._common import MODEL, add_output_flags, config_help, emit
from ._flags import Section, add_section_flags
from .distill import STUDENT, train, train_summary

SFT = Section("sft", SFTConfig, ("data", "num_samples", "max_len", *TrainConfig.model_fields))


def add_sft_parser(sub) -> None:
    p = sub.add_parser("sft", help="supervised fine-tuning on prompt/response pairs (loss on the response only)")
    add_section_flags(p, (MODEL, SFT), overrides=STUDENT)
    add_output_flags(p, config_help((MODEL, SFT)))
    p.set_defaults(func=cmd_sft)


def cmd_sft(args: argparse.Namespace) -> int:
    from sparsekd_core.dist import rank
    from sparsekd_core.sft import sft

    cfg, model_cfg, res = train(args, SFT, ("data", "out"), sft)
    if rank() == 0:
        emit(res.as_dict() | {"student": model_cfg.model, "data": cfg.data}, args.json, train_summary("sft", res))
    return 0
