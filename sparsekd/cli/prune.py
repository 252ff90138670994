"""`sparsekd prune`: structured SVD (low-rank), WANDA or depth pruning of a model into a compressed checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from sparsekd_core.config import PAPER_ROUND_TARGETS, ConfigError, ModelConfig, PruneConfig, build

from ._common import MODEL, add_output_flags, config_help, dtype_name, emit, log, progress, require_model, sections
from ._flags import Flag, Section, add_section_flags

PRUNE = Section("prune", PruneConfig)


def _targets(text: str) -> list[float]:
    """--target-reduction 0.15 or a list of successive rounds 0.15,0.22,0.29 (or 'paper' = the 8 paper rounds)."""
    if text == "paper":
        return list(PAPER_ROUND_TARGETS)
    try:
        return [float(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number in (0, 1), a comma-separated increasing list "
                                         "of rounds (0.15,0.35) or 'paper'") from None


def add_prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="structured SVD (low-rank) or WANDA pruning of the MLP projections")
    add_section_flags(p, (MODEL, PRUNE), overrides={
        "drop_blocks": Flag(metavar="N"),
        "target_reduction": Flag(type=_targets, metavar="R", note=" A list 0.15,0.35 runs successive rounds; 'paper' = "
                                 f"the paper's {len(PAPER_ROUND_TARGETS)} rounds."),
        "energy": Flag(metavar="TAU"),
    })
    p.add_argument("--out", help="output directory: a compressed checkpoint that every stage loads")
    p.add_argument("--dense-out", help="also write the merged dense checkpoint (stock transformers) here")
    add_output_flags(p, config_help((MODEL, PRUNE)))
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
    from sparsekd_core.models import load_for, weights_digest
    from sparsekd_core.stages import prune_and_save

    values = sections(args, (MODEL, PRUNE))
    require_model(values)
    if not args.out:
        raise ConfigError("prune: --out DIR is required (where the pruned checkpoint is written)")
    targets = values["prune"].pop("target_reduction", None)
    targets = targets if isinstance(targets, list) or targets is None else [targets]
    if targets and any(b <= a for a, b in zip(targets, targets[1:])):
        raise ConfigError(f"prune.target_reduction={targets}: successive rounds must increase")
    model_cfg = build(ModelConfig, "model", values["model"])
    configs = [build(PruneConfig, "prune", {**values["prune"], "target_reduction": t}) for t in targets or [None]]
    out = Path(args.out).expanduser()
    if out.resolve() == Path(model_cfg.model).expanduser().resolve():
        raise ConfigError(f"prune: --out {args.out!r} is the input model; write the next round elsewhere")

    loaded = load_for("prune", model_cfg, log=log)  # fp32 whatever --dtype says (precision.py)
    method = configs[0].method
    run = prune_and_save(loaded, configs, out, parent=f"{model_cfg.model} (weights {weights_digest(loaded.model)})",
                         dense_out=args.dense_out, log=log,
                         progress_factory=progress(f"prune {method}", "seq" if method == "depth" else "matrix"))
    result = run.summary
    result.update(out=str(out), dense_out=args.dense_out, save_seconds=run.save_seconds,
                  weights_bytes=run.weights_bytes, saved_total_params=run.saved_total_params,
                  model=model_cfg.model, device=loaded.device.type, dtype=dtype_name(loaded))
    last = run.reports[-1]
    unit = "nonzero " if last.unstructured else ""
    table = _layer_table(result["layers"]) if result["layers"] else _distance_table(result)
    human = (f"{table}\n"
             f"{last.method}: MLP {unit}params {result['mlp_params_before']:,} → {result['mlp_params_after']:,} "
             f"(reduction {result['mlp_reduction']:.4f} of the dense MLP), total {result['total_params_before']:,} "
             f"→ {result['total_params_after']:,}; {result['seconds']:.1f}s; saved {out}")
    emit(result, args.json, human)
    return 0
