"""`sparsekd distill`: train a student on a teacher cache (offline self-referential KD; alpha 0 = CE-only).

``train`` is the part every training verb shares (``sft`` too): configs, the student under the precision
policy, a progress bar, the run.
"""

from __future__ import annotations

import argparse
import sys

from sparsekd_core.config import DistillConfig, TrainConfig

from ._common import MODEL, add_output_flags, config_help, configs, emit, log
from ._flags import Flag, Section, add_section_flags

STUDENT = {"model": Flag(name="--student")}
DISTILL = Section("distill", DistillConfig, ("cache", "alpha", "temperature", "tail", *TrainConfig.model_fields))


def add_distill_parser(sub) -> None:
    p = sub.add_parser("distill", help="train a student on a teacher cache (offline self-referential KD)")
    add_section_flags(p, (MODEL, DISTILL), overrides=STUDENT)
    add_output_flags(p, config_help((MODEL, DISTILL)))
    p.set_defaults(func=cmd_distill)


def train(args: argparse.Namespace, stage: Section, required: tuple[str, ...], run) -> tuple:
    """Shared by distill and sft: configs, the student under the precision policy, a progress bar, the run.
    Under torchrun every rank runs this; the run's core logs and reports progress on rank 0 only."""
    from tqdm.auto import tqdm

    from sparsekd_core import dist
    from sparsekd_core.models import load_for

    model_cfg, cfg = configs(args, stage, required, model_flag="--student")
    dist.bind_cuda_device()  # under torchrun each rank loads onto its own GPU
    loaded = load_for("train", model_cfg, log=log if dist.rank() == 0 else lambda m: None)  # fp32 master weights
    bar = None

    def progress(step: int, total: int, postfix: dict) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, initial=step - 1, desc=stage.name, unit="step", file=sys.stderr, disable=None)
        bar.update(1)
        bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    try:
        res = run(cfg, loaded.model, loaded.tokenizer, student_spec=model_cfg.model, log=log, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    return cfg, model_cfg, res


def train_summary(verb: str, res) -> str:
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    return (f"{verb}: {res.steps} steps -> {res.out}: kd {fmt(res.kd_loss_first)} -> {fmt(res.kd_loss_last)}, ce "
            f"{fmt(res.ce_loss_first)} -> {fmt(res.ce_loss_last)}, best val ppl {fmt(res.val_ppl_best)} (step "
            f"{res.best_step}; start {fmt(res.val_ppl_start)}), {res.tokens_per_s:.0f} tokens/s, stop: "
            f"{res.stop_reason}; {res.precision}; MLP {res.mlp_nonzero:,} nonzero of {res.mlp_params:,} "
            f"({res.mlp_zero_fraction:.2%} zero)")


def cmd_distill(args: argparse.Namespace) -> int:
    from sparsekd_core.dist import rank
    from sparsekd_core.distill import distill

    cfg, model_cfg, res = train(args, DISTILL, ("cache", "out"), distill)
    result = res.as_dict() | {"student": model_cfg.model, "cache": cfg.cache, "alpha": cfg.alpha,
                              "temperature": cfg.temperature, "tail": cfg.tail}
    if rank() == 0:  # under torchrun: one JSON line for the run, not one per rank
        emit(result, args.json, train_summary("distilled", res))
    return 0
