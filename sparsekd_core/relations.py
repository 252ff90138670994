"""An eval set's relation to the KD corpus: the one place that decides what a report may call it.

A set is *held-out documents* when its source is one the corpus draws from (other documents of it: WikiText-2 test
against a corpus holding WikiText-2 train, held-out C4 documents against C4 train), *out of corpus* when the corpus
does not draw from its source at all, and *in corpus* when it names a split the corpus itself is built from. Only
the first two are fit to judge generalisation; only *out of corpus* is "out of domain".

Sources are compared by family: packaged and hub copies of a dataset are one family, and the packaged stdlib code
(``python:*``) and CodeParrot are both ``code``. Local files and ``hf:`` sets are not known here (``None``): their
relation is the user's to state.
"""

from __future__ import annotations

from typing import Any, Iterable

from .config import HUB_PREFIX, NAMED_MIXTURES, NAMED_SOURCES

HELD_OUT = "held-out documents"
OUT_OF_CORPUS = "out of corpus"
IN_CORPUS = "in corpus"

_FAMILY = {"wikitext2": "wikitext2", "gsm8k": "gsm8k", "c4": "c4", "python": "code", "codeparrot": "code"}


def _named(spec: str) -> str | None:
    """A named source without its hub prefix (``hub:c4:train`` → ``c4:train``), or None for anything else."""
    bare = spec[len(HUB_PREFIX):] if spec.startswith(HUB_PREFIX) else spec
    return bare if bare in NAMED_SOURCES or (spec.startswith(HUB_PREFIX) and ":" in bare) else None


def family(spec: str) -> str | None:
    """The source family of a named data spec (``c4:heldout`` → ``c4``; ``python:stdlib`` → ``code``), or None."""
    bare = _named(spec)
    return None if bare is None else _FAMILY.get(bare.split(":")[0])


def corpus_sources(corpus: str) -> list[str] | None:
    """The named sources a corpus spec draws from (a mixture's components, or the source itself), or None when the
    corpus is a local file or anything else this module cannot see into."""
    if corpus in NAMED_MIXTURES:
        return list(NAMED_MIXTURES[corpus])
    return [corpus] if _named(corpus) is not None else None


def corpus_relation(corpus: str, eval_spec: str) -> str | None:
    """``in corpus``, ``held-out documents`` or ``out of corpus`` for the eval data ``eval_spec`` against the KD
    corpus ``corpus``; None when either is not a named source or mixture (a local file: unknown here)."""
    sources = corpus_sources(corpus)
    fam = family(eval_spec)
    if sources is None or fam is None or any(family(s) is None for s in sources):
        return None
    bare = _named(eval_spec)
    if any(_named(s) == bare for s in sources):
        return IN_CORPUS
    return HELD_OUT if fam in {family(s) for s in sources} else OUT_OF_CORPUS


def relations_of(corpus: str, eval_sets: Iterable[Any]) -> dict[str, str]:
    """{name: its relation to ``corpus``} for each perplexity eval set (objects with ``name``, ``data``, ``kind``);
    "relation not known" where this module cannot tell (a local file)."""
    return {es.name: corpus_relation(corpus, es.data) or "relation not known" for es in eval_sets
            if es.kind == "perplexity"}
