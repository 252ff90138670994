"""Checks an experiment runs on its data before any work: what it evaluates on must be held out from what it trains on.

Pure functions over stage configs; the text is read through ``sparsekd_core.data`` (named sources, hub streams and
files resolve to the same documents everywhere).
"""

from __future__ import annotations

from .config import CacheConfig


def check_held_out(eval_sets: dict[str, str], val_data: str | None, corpus: CacheConfig) -> dict:
    """Every eval set and the distillation's validation text must be disjoint from the KD corpus ``corpus`` builds.

    ``eval_sets``: {name: data spec}; ``val_data``: the training stage's validation text (checked as
    ``distill.val_data``), or None. An overlap raises ``data.DataOverlapError`` naming the set, one line, before
    any work; otherwise returns {"eval_documents", "corpus_documents", "shared": 0} for the report. Exact: documents
    and paragraphs are compared by hashes of their whitespace-normalised text (``data.check_disjoint``).
    """
    from .cache import corpus_reads
    from .data import check_disjoint

    held_out = dict(eval_sets)
    if val_data is not None:
        held_out["distill.val_data"] = val_data
    return check_disjoint(held_out, corpus_reads(corpus))
