"""Text sources, sample validation, content digests and the KD-corpus builder.

A data spec is one of
  * a named source ``family:split`` (see ``config.NAMED_SOURCES``): always the copy shipped in
    ``sparsekd_core/resources`` (or, for ``python:stdlib`` and ``python:heldout``, the interpreter's own
    standard-library source, split ~90/10), so a name means the same documents on every machine, online or not;
  * ``hub:family:split`` (``config.HUB_SOURCES``): the Hugging Face dataset, asked for explicitly; large sources
    (C4, CodeParrot) are streamed and read up to a document limit (``hub:c4:train@5000``; the default is below);
  * a local file: ``.txt``/``.raw`` (read whole), ``.jsonl``/``.json`` (a ``text`` field, or GSM8K's
    ``question`` + ``answer``), ``.parquet`` (same columns), or a directory of such files / ``.py`` files;
  * a named mixture (``mix:paper`` from the hub, ``mix:paper-offline`` packaged) — only where a corpus is built.

``source_digest`` is the content digest of a source's documents (a stage key holds it, not the spec's name, so a
file copied elsewhere is the same data and an edited file is not). ``check_disjoint`` refuses eval sets that share
documents with a KD corpus.

Every document that goes into a corpus is validated first (``classify_document``). Bad documents are dropped
and counted per source and reason; a source with more than ``max_bad_fraction`` bad documents fails the build,
so a corpus silently made of placeholder files (which once happened to the paper's authors) cannot be built.
A corpus sample is a document, as in the paper: it starts at a document (at a random offset in a long one), and
a document gives at most ``max_sequences_per_document`` sequences; a short document is continued by the next ones.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.resources
import json
import re
import sysconfig
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .config import (HUB_PREFIX, HUB_SOURCES, NAMED_SOURCES, STREAMED_HUB_SOURCES, ConfigError, MixtureConfig,
                     parse_hf_spec, parse_hub_spec)


class DataQualityError(ValueError):
    """A source has more bad documents than allowed; the message names the source and the counts."""


class DataUnavailableError(RuntimeError):
    """A source cannot be read here (e.g. a hub-only dataset while offline)."""


# ----------------------------------------------------------------------------------------------------------------
# Reading sources


def _resource(name: str) -> Path:
    return Path(str(importlib.resources.files("sparsekd_core") / "resources" / name))


def _read_gz_text(name: str) -> str:
    with gzip.open(_resource(name), "rb") as f:
        return f.read().decode("utf-8")


def _read_jsonl_gz(name: str) -> list[dict]:
    return [json.loads(line) for line in _read_gz_text(name).splitlines() if line.strip()]


_WIKI_TITLE = re.compile(r"^ = [^=].* = $")


def wikitext_articles(raw: str) -> list[str]:
    """Split WikiText raw text into articles at top-level ``" = Title = "`` lines (sub-headings are ``= =``)."""
    articles: list[list[str]] = []
    for line in raw.splitlines():
        if _WIKI_TITLE.match(line) or not articles:
            articles.append([])
        articles[-1].append(line)
    docs = ["\n".join(a).strip() for a in articles]
    # Blank lines before the first title are layout, not a document.
    return docs[1:] if docs and not docs[0] and not _WIKI_TITLE.match(articles[0][0]) else docs


def wikitext_rows_to_raw(rows: Iterable[str]) -> str:
    """Hub rows → the original raw file text (a blank row was the line " ", any other row was ``line + "\\n"``)."""
    return "".join((" " if row == "" else row.removesuffix("\n")) + "\n" for row in rows)


def gsm8k_text(record: dict) -> str:
    return f"{record['question']}\n{record['answer']}"


def _record_text(record: dict, where: str) -> str:
    if "question" in record and "answer" in record:
        return gsm8k_text(record)
    for prompt, response in (("prompt", "response"), ("instruction", "output")):  # instruction data
        if prompt in record and response in record:
            return f"{record[prompt]}\n{record[response]}"
    for key in ("text", "content", "code"):
        if key in record:
            value = record[key]
            return value if isinstance(value, str) else ""
    raise ConfigError(f"data: {where}: records need a 'text' (or 'content') field, 'question' + 'answer', or "
                      "'prompt' + 'response'")


STDLIB_HELDOUT_MOD = 10  # python:heldout = the stdlib modules whose path's CRC-32 is 0 mod this (about 10%)


def _stdlib_documents(min_bytes: int = 1024, heldout: bool = False) -> list[str | bytes]:
    """Python's standard-library modules (>= 1 KB, no test suites), as raw bytes, in a stable order.

    ``python:stdlib`` and ``python:heldout`` split them by a hash of the module's path (heldout: ~10%), so code
    held out of a KD corpus is code of the same kind that no corpus built from ``python:stdlib`` can contain."""
    kept, held = _stdlib_split(min_bytes)
    return list(held if heldout else kept)


@functools.cache
def _stdlib_split(min_bytes: int) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    """(python:stdlib, python:heldout) documents, read and split once per process: every eval stage loads its
    texts before its key is looked up, and the held-out filter hashes every kept module."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}
    files = sorted(
        p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts) and p.stat().st_size >= min_bytes
    )
    held = [zlib.crc32(p.relative_to(root).as_posix().encode()) % STDLIB_HELDOUT_MOD == 0 for p in files]
    kept = tuple(p.read_bytes() for p, h in zip(files, held) if not h)
    # A held-out module that shares a block with the rest (a licence header, a copied function) is dropped, so
    # that check_disjoint passes against any corpus drawn from python:stdlib.
    seen = _normalised_hashes(kept)
    candidates = (p.read_bytes() for p, h in zip(files, held) if h)
    return kept, tuple(doc for doc in candidates if not _normalised_hashes([doc]) & seen)


def _hub_rows(path: str, name: str | None, split: str, column: str | None, limit: int | None) -> list:
    import datasets

    streaming = limit is not None
    ds = datasets.load_dataset(path, name, split=split, streaming=streaming)
    rows = []
    for i, row in enumerate(ds):
        if limit is not None and i >= limit:
            break
        rows.append(row if column is None else row[column])
    return rows


# (hub path, config, split, column or None for the whole record) for the hub sources.
_HUB = {
    "wikitext2:test": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "text"),
    "wikitext2:valid": ("Salesforce/wikitext", "wikitext-2-raw-v1", "validation", "text"),
    "wikitext2:train": ("Salesforce/wikitext", "wikitext-2-raw-v1", "train", "text"),
    "gsm8k:train": ("openai/gsm8k", "main", "train", None),
    "gsm8k:test": ("openai/gsm8k", "main", "test", None),
    "c4:train": ("allenai/c4", "en", "train", "text"),
    "c4:heldout": ("allenai/c4", "en", "validation", "text"),
    "codeparrot:train": ("codeparrot/codeparrot-clean", None, "train", "content"),
}
HUB_STREAM_LIMIT = 10_000  # documents read from a streamed hub source when its spec gives no `@N`
# Embedded C4 sample: documents [0, 900) are train (c4:train), [900, 980) held out for evaluation (c4:heldout),
# [980, 1000) held out for validation during training (c4:val), so a kept step is not chosen on the eval text.
_C4_HELDOUT_START = 900
_C4_VAL_START = 980


def hub_limit(spec: str, default: int | None = None) -> int | None:
    """The document limit a streamed `hub:` spec is read with (its `@N`, else `default`, else HUB_STREAM_LIMIT);
    None for a source that is read whole."""
    parsed = parse_hub_spec(spec)
    if parsed is None or parsed[0] not in STREAMED_HUB_SOURCES:
        return None
    return parsed[1] or default or HUB_STREAM_LIMIT


def _hub_rows_for(spec: str, limit: int | None) -> tuple[str, list]:
    """The rows of a `hub:` spec, after checking that the hub can be reached (fail fast, with what to do)."""
    from .models import hub_reachable

    name, _ = parse_hub_spec(spec)
    if not hub_reachable():
        packaged = name if name in NAMED_SOURCES else None
        raise DataUnavailableError(
            f"data source {spec!r} asks for the Hugging Face hub, which is not reachable here; "
            + (f"use the packaged copy {packaged!r} or a local file" if packaged else "use a local file")
            + " (a name without 'hub:' never touches the network)"
        )
    path, cfg, split, column = _HUB[name]
    return name, _hub_rows(path, cfg, split, column, hub_limit(spec, limit))


def hf_rows(spec: str, limit: int | None = None) -> list[dict]:
    """Rows of any Hugging Face dataset `hf:org/name[:config]:split[@N]` (online only), streamed: the first `@N`
    (else ``limit``, else HUB_STREAM_LIMIT) rows."""
    from .models import hub_reachable

    repo, config, split, spec_limit = parse_hf_spec(spec)
    if not hub_reachable():
        raise DataUnavailableError(f"data {spec!r} is a Hugging Face dataset and the hub is not reachable here; "
                                   "save its records as a .jsonl and give the file")
    import datasets

    take = spec_limit or limit or HUB_STREAM_LIMIT
    rows = []
    for i, row in enumerate(datasets.load_dataset(repo, config, split=split, streaming=True)):
        if i >= take:
            break
        rows.append(dict(row))
    return rows


def _hub_documents(spec: str, limit: int | None) -> list[str | bytes]:
    name, rows = _hub_rows_for(spec, limit)
    if name.startswith("wikitext2:"):
        return wikitext_articles(wikitext_rows_to_raw(rows))
    if name.startswith("gsm8k:"):
        return [gsm8k_text(r) for r in rows]
    return rows


def _named_documents(name: str) -> list[str | bytes]:
    """A packaged source's documents (never the network)."""
    if name in ("python:stdlib", "python:heldout"):
        return _stdlib_documents(heldout=name == "python:heldout")
    if name.startswith("wikitext2:"):
        return wikitext_articles(_embedded_wikitext(name))
    if name.startswith("gsm8k:"):
        return [gsm8k_text(r) for r in gsm8k_records(name)]
    if name in ("c4:train", "c4:heldout", "c4:val"):
        docs = [r["text"] for r in _read_jsonl_gz("c4-en-train-sample.jsonl.gz")]
        return {"c4:train": docs[:_C4_HELDOUT_START], "c4:heldout": docs[_C4_HELDOUT_START:_C4_VAL_START],
                "c4:val": docs[_C4_VAL_START:]}[name]
    raise DataUnavailableError(f"data source {name!r} has no packaged copy; ask for {HUB_PREFIX + name!r}")


def gsm8k_records(spec: str) -> list[dict]:
    """GSM8K problems as {"question", "answer"} records: the packaged `gsm8k:train` (first 4,000) or `gsm8k:test`
    (all 1,319), `hub:gsm8k:*`, or a local .jsonl file with those fields."""
    if spec == "gsm8k:train":
        return _read_jsonl_gz("gsm8k-train-sample.jsonl.gz")
    if spec == "gsm8k:test":
        return _read_jsonl_gz("gsm8k-test.jsonl.gz")
    hub = parse_hub_spec(spec)
    if hub is not None and hub[0].startswith("gsm8k:"):
        return list(_hub_rows_for(spec, None)[1])
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".jsonl" and path.is_file():
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if records and all("question" in r and "answer" in r for r in records):
            return records
    raise ConfigError(f"data={spec!r}: not a GSM8K source; give gsm8k:test, gsm8k:train, hub:gsm8k:test or a "
                      ".jsonl file of {{\"question\", \"answer\"}} records")


def _embedded_wikitext(name: str) -> str:
    return _read_gz_text(
        {
            "wikitext2:test": "wikitext2-test.raw.gz",
            "wikitext2:valid": "wikitext2-valid.raw.gz",
            "wikitext2:train": "wikitext2-train-prefix.txt.gz",
        }[name]
    )


def _file_records(path: Path) -> list[str | bytes]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        docs: list[str | bytes] = []
        with open(path, "rb") as f:
            lines = f.read().splitlines() if suffix == ".jsonl" else [f.read()]
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                loaded = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                docs.append(line)  # kept as raw bytes: counted as undecodable by validation
                continue
            for record in loaded if isinstance(loaded, list) else [loaded]:
                docs.append(_record_text(record, f"{path}:{n}"))
        return docs
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return [_record_text(r, str(path)) for r in pq.read_table(path).to_pylist()]
    return [path.read_bytes()]


def load_documents(spec: str, limit: int | None = None) -> list[str | bytes]:
    """All documents of a source, unvalidated (raw bytes where the input could not be decoded).

    ``limit``: the document limit of a streamed `hub:` source whose spec gives no `@N` (default
    ``HUB_STREAM_LIMIT``); packaged and local sources are read whole.
    """
    if spec in NAMED_SOURCES:
        return _named_documents(spec)
    if parse_hub_spec(spec) is not None:
        return _hub_documents(spec, limit)
    if spec in HUB_SOURCES:
        raise DataUnavailableError(f"data source {spec!r} has no packaged copy; ask for the hub explicitly with "
                                   f"{HUB_PREFIX + spec!r} (online), or use a packaged source or a local file")
    if parse_hf_spec(spec) is not None:
        return [_record_text(r, spec) for r in hf_rows(spec, limit)]
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".txt", ".raw", ".py", ".jsonl", ".parquet"))
        return [doc for p in files for doc in _file_records(p)]
    if path.suffix.lower() in (".txt", ".raw"):
        text = path.read_bytes()
        try:
            decoded = text.decode("utf-8")
        except UnicodeDecodeError:
            return [text]
        # A WikiText-style file splits into articles; any other text file into blank-line-separated blocks.
        if any(_WIKI_TITLE.match(line) for line in decoded.splitlines()[:50]):
            return wikitext_articles(decoded)
        return [block.strip("\n") for block in re.split(r"\n\s*\n", decoded)]
    return _file_records(path)


def load_text(spec: str) -> str:
    """One evaluation text: a named source's canonical text, or a local file read whole.

    ``wikitext2:*`` gives the original raw file text (the packaged copy; ``hub:wikitext2:*`` rebuilds the same
    text from the hub's rows); a ``.jsonl``/``.parquet`` file or another source gives its documents joined by
    blank lines (a streamed hub source: its first ``@N`` documents).
    """
    if spec.startswith("mix:"):
        raise ConfigError(f"data.data={spec!r}: a mixture cannot be evaluated; give a single source or a file")
    if spec in NAMED_SOURCES and spec.startswith("wikitext2:"):
        return _embedded_wikitext(spec)
    hub = parse_hub_spec(spec)
    if hub is not None and hub[0].startswith("wikitext2:"):
        return wikitext_rows_to_raw(_hub_rows_for(spec, None)[1])
    path = Path(spec).expanduser()
    if spec not in NAMED_SOURCES and hub is None and path.is_file() and path.suffix.lower() in (".txt", ".raw"):
        return _eval_document_text(spec, path.read_bytes(), 0)
    docs = [_eval_document_text(spec, d, i) for i, d in enumerate(load_documents(spec))]  # code files: bytes
    return "\n\n".join(d for d in docs if d.strip())


def _eval_document_text(spec: str, doc: str | bytes, index: int) -> str:
    """A document of an evaluation text, decoded strictly: a replaced byte would change the text that is scored,
    and its perplexity with it, without a trace. Raises DataQualityError naming the file and the byte offset."""
    if isinstance(doc, str):
        return doc
    try:
        return doc.decode("utf-8")
    except UnicodeDecodeError as err:
        where, offset = _locate_document(spec, doc, index)
        raise DataQualityError(
            f"data source {spec!r}: {where} is not UTF-8: {err.reason} (byte 0x{doc[err.start]:02x}) at byte "
            f"offset {offset + err.start}; evaluation text is never altered: re-encode the file as UTF-8 from its "
            "encoding (e.g. `iconv -f latin1 -t utf-8`) or leave it out of the source"
        ) from None


def _locate_document(spec: str, doc: bytes, index: int) -> tuple[str, int]:
    """(the local file that holds ``doc``, the offset of ``doc`` in it); a document of a named source, which has no
    file the user can edit, is named by its index. Only called on the error path: it reads the source again."""
    path = Path(spec).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        files = []  # a named source: python:stdlib's modules are bytes
    for file in files:
        at = file.read_bytes().find(doc)
        if at >= 0:
            return f"file {str(file)!r}", at
    return f"document {index}", 0


# ----------------------------------------------------------------------------------------------------------------
# Content digests and disjointness


def _doc_bytes(doc: str | bytes) -> bytes:
    return doc if isinstance(doc, bytes) else doc.encode("utf-8", "surrogatepass")


def documents_digest(docs: Iterable[str | bytes]) -> str:
    """Digest of a document list (order and content), 16 hex chars."""
    h = hashlib.blake2b(digest_size=8)
    for doc in docs:
        b = _doc_bytes(doc)
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def text_digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def _memo_key(spec: str, limit: int | None) -> tuple:
    """Packaged and hub sources are memoised per process by name; a local file or directory also by the sizes
    and modification times of its files, so an edited file is read again."""
    path = Path(spec).expanduser()
    if spec in NAMED_SOURCES or parse_hub_spec(spec) is not None or not path.exists():
        return (spec, limit)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return (spec, limit, tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


_DIGESTS: dict[tuple, str] = {}


def source_digest(spec: str, limit: int | None = None) -> str:
    """Content digest of the documents a source gives (see ``load_documents``); memoised per process."""
    key = _memo_key(spec, limit)
    if key not in _DIGESTS:
        _DIGESTS[key] = documents_digest(load_documents(spec, limit))
    return _DIGESTS[key]


class DataOverlapError(ConfigError):
    """An evaluation set shares documents with the KD corpus (or the validation text with it)."""


MIN_BLOCK_CHARS = 50  # blank-line blocks shorter than this (headings, boilerplate) are not compared alone


def _normalised_hashes(docs: Iterable[str | bytes]) -> set[bytes]:
    """Hashes of each document and of each of its blank-line-separated blocks of >= MIN_BLOCK_CHARS characters,
    whitespace-normalised: a document copied whole, or split into paragraphs by another file format, matches."""
    hashes = set()
    for doc in docs:
        text = _doc_bytes(doc).decode("utf-8", "replace")
        pieces = [text] + [b for b in re.split(r"\n\s*\n", text) if len(b.strip()) >= MIN_BLOCK_CHARS]
        for piece in pieces:
            compact = " ".join(piece.split())
            if compact:
                hashes.add(hashlib.blake2b(compact.encode("utf-8"), digest_size=16).digest())
    return hashes


_HASHES: dict[tuple, tuple[set[bytes], int]] = {}


def _source_hashes(spec: str, limit: int | None) -> tuple[set[bytes], int]:
    """(hashes, number of documents) of a source; memoised (a paper run checks the same sources per sub-flow)."""
    key = _memo_key(spec, limit)
    if key not in _HASHES:
        docs = load_documents(spec, limit)
        _HASHES[key] = (_normalised_hashes(docs), len(docs))
    return _HASHES[key]


def check_disjoint(eval_sets: dict[str, str], corpus: dict[str, int | None]) -> dict:
    """Refuse eval sets that share a document (or a paragraph of >= MIN_BLOCK_CHARS characters) with any corpus
    source, compared by hashes of the whitespace-normalised text. Returns {"eval_documents", "corpus_documents",
    "shared": 0} for the report.

    ``eval_sets``: {name: spec}; ``corpus``: {source spec: the document limit the corpus build reads it with}
    (``cache.corpus_reads``), so exactly the documents a corpus can contain are checked.
    """
    corpus_hashes: set[bytes] = set()
    corpus_documents = 0
    for spec, limit in corpus.items():
        hashes, count = _source_hashes(spec, limit)
        corpus_hashes |= hashes
        corpus_documents += count
    eval_total = 0
    for name, spec in eval_sets.items():
        hashes, count = _source_hashes(spec, None)
        eval_total += count
        shared = len(hashes & corpus_hashes)
        if shared:
            raise DataOverlapError(
                f"eval set {name!r} ({spec}) shares {shared} document(s) or paragraph(s) with the KD corpus "
                f"({', '.join(corpus)}); an evaluation set must be held out: use another set or another corpus"
            )
    return {"eval_documents": eval_total, "corpus_documents": corpus_documents, "shared": 0}


# ----------------------------------------------------------------------------------------------------------------
# Validation

_PLACEHOLDER_MARKERS = (
    "version https://git-lfs.github.com/spec/",  # a Git LFS pointer instead of the file
    "placeholder",  # e.g. cloud-sync "online-only" stubs, "placeholder file"
    "this file is not available offline",
    "available online only",
)
MIN_CHARS = 20  # a real sample has more than this many non-whitespace characters
MIN_COMPRESSION = 0.08  # zlib ratio below this on >= 200 chars = one short stub repeated over and over


def classify_document(doc: str | bytes) -> str | None:
    """None if the document is usable, else the reason it is bad.

    Reasons: ``undecodable`` (not UTF-8), ``binary`` (NUL/control characters or U+FFFD), ``empty``
    (empty or whitespace only), ``placeholder`` (a stub: too short, an LFS pointer, a placeholder notice),
    ``repetitive`` (one short piece repeated: zlib compresses it below 8%).
    Duplicates are found across a source by ``validate_documents``.
    """
    if isinstance(doc, bytes):
        try:
            doc = doc.decode("utf-8")
        except UnicodeDecodeError:
            return "undecodable"
    stripped = doc.strip()
    if not stripped:
        return "empty"
    controls = sum(1 for ch in doc if (ord(ch) < 32 and ch not in "\t\n\r\f\v") or ch == "\ufffd")
    if "\x00" in doc or controls > 0.01 * len(doc):
        return "binary"
    compact = "".join(stripped.split())
    if len(compact) < MIN_CHARS:
        return "placeholder"
    head = stripped[:300].lower()
    if len(stripped) < 2000 and any(marker in head for marker in _PLACEHOLDER_MARKERS):
        return "placeholder"
    encoded = stripped.encode("utf-8")
    if len(encoded) >= 200 and len(zlib.compress(encoded, 6)) < MIN_COMPRESSION * len(encoded):
        return "repetitive"
    return None


@dataclass
class SourceReport:
    source: str
    documents: int = 0
    bad: dict[str, int] = field(default_factory=dict)
    sequences: int = 0
    documents_used: int = 0
    tokens: int = 0

    @property
    def bad_total(self) -> int:
        return sum(self.bad.values())

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "documents": self.documents,
            "bad": dict(self.bad),
            "bad_total": self.bad_total,
            "documents_used": self.documents_used,
            "sequences": self.sequences,
            "tokens": self.tokens,
        }


def validate_documents(source: str, docs: list[str | bytes], max_bad_fraction: float) -> tuple[list[str], SourceReport]:
    """Drop bad documents (counted per reason); raise DataQualityError if more than the allowed fraction is bad."""
    report = SourceReport(source=source, documents=len(docs))
    bad: Counter[str] = Counter()
    seen: set[bytes] = set()
    good: list[str] = []
    for doc in docs:
        reason = classify_document(doc)
        if reason is None:
            text = doc.decode("utf-8") if isinstance(doc, bytes) else doc
            key = hashlib.blake2b(text.strip().encode("utf-8"), digest_size=16).digest()
            if key in seen:
                reason = "duplicate"
            else:
                seen.add(key)
                good.append(text)
        if reason is not None:
            bad[reason] += 1
    report.bad = dict(sorted(bad.items()))
    if not docs:
        raise DataQualityError(f"data source {source!r} has no documents")
    fraction = report.bad_total / len(docs)
    if fraction > max_bad_fraction:
        detail = ", ".join(f"{k}={v}" for k, v in report.bad.items())
        raise DataQualityError(
            f"data source {source!r}: {report.bad_total} of {len(docs)} documents are bad "
            f"({fraction:.1%} > allowed {max_bad_fraction:.1%}: {detail}); fix or remove the source"
        )
    return good, report


# ----------------------------------------------------------------------------------------------------------------
# Mixture


def split_counts(total: int, weights: list[float]) -> list[int]:
    """Largest-remainder split of `total` into integer parts proportional to `weights` (sums exactly to total)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def _stable_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little")


def bos_token(tokenizer) -> int | None:
    """The id every model input starts with: the tokenizer's BOS when the tokenizer itself puts one in front of an
    encoded text (Gemma, Llama 2/3), else None (SmolLM2, Qwen, GPT-2 put nothing there).

    The one place this is decided: the corpus of a cache, calibration data and every perplexity window go through
    it. A model trained with BOS in front of every document is out of distribution without it: Gemma 3 270M's
    perplexity on the first 2,044 WikiText-2 test tokens (windows of 512) is 51.1 without and 21.6 with it
    (``benchmarks/bos_effect.py``)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos) if len(ids) and ids[0] == bos else None


def with_bos(tokenizer, ids: list[int]) -> list[int]:
    """``ids`` with the model's BOS (``bos_token``) in front, unless it is there already (a chat template that
    writes it) or the model takes none."""
    bos = bos_token(tokenizer)
    return [bos] + ids if bos is not None and (not ids or ids[0] != bos) else ids


def pack_sequences(docs: Iterable[str], tokenizer, seq_len: int, count: int) -> list[list[int]]:
    """Tokenize documents in order (each followed by EOS) and cut the stream into up to `count` sequences of
    seq_len: the calibration data of pruning (a KD corpus uses ``document_sequences`` instead). With a BOS
    (``bos_token``) each sequence is BOS + seq_len - 1 tokens of the stream."""
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    bos = bos_token(tokenizer)
    head = [bos] if bos is not None else []
    body = seq_len - len(head)
    buffer: list[int] = []
    rows: list[list[int]] = []
    for doc in docs:
        if len(rows) >= count:
            break
        buffer.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if sep is not None:
            buffer.append(sep)
        while len(buffer) >= body and len(rows) < count:
            rows.append(head + buffer[:body])
            buffer = buffer[body:]
    return rows


def document_sequences(docs: Iterable[str], tokenizer, seq_len: int, count: int | None, max_per_document: int,
                       rng: np.random.Generator) -> tuple[list[list[int]], int]:
    """Cut ``count`` sequences of ``seq_len`` tokens from documents in the given order (all they give if None),
    each sample starting at a document, as the paper's samples are documents.

    A document of at least ``seq_len`` tokens (each document ends with EOS) gives up to ``max_per_document``
    consecutive sequences from a random offset; a shorter one starts a sample that continues with the next
    documents (each used once, never split across samples) and drops the remainder. Returns the sequences and
    the number of distinct documents they contain. With a BOS (``bos_token``) every sequence is that BOS followed by
    seq_len - 1 tokens cut as above.
    """
    bos = bos_token(tokenizer)
    if bos is None:
        return _document_sequences(docs, tokenizer, seq_len, count, max_per_document, rng)
    rows, used = _document_sequences(docs, tokenizer, seq_len - 1, count, max_per_document, rng)
    return [[bos] + row for row in rows], used


def _document_sequences(docs: Iterable[str], tokenizer, seq_len: int, count: int | None, max_per_document: int,
                        rng: np.random.Generator) -> tuple[list[list[int]], int]:
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    tail = [sep] if sep is not None else []
    rows: list[list[int]] = []
    used = 0
    docs = iter(docs)
    for doc in docs:
        if count is not None and len(rows) >= count:
            break
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"] + tail
        if len(ids) >= seq_len:
            k = min(max_per_document, len(ids) // seq_len)
            if count is not None:
                k = min(k, count - len(rows))
            offset = int(rng.integers(0, len(ids) - k * seq_len + 1))
            rows.extend(ids[offset + j * seq_len : offset + (j + 1) * seq_len] for j in range(k))
            used += 1
            continue
        pieces = 1
        while len(ids) < seq_len:  # a short document: continue the sample with the next ones
            nxt = next(docs, None)
            if nxt is None:
                break
            ids += tokenizer(nxt, add_special_tokens=False)["input_ids"] + tail
            pieces += 1
        if len(ids) >= seq_len:  # an unfinished last sample is dropped, and its documents are not counted
            rows.append(ids[:seq_len])
            used += pieces
    return rows, used


@dataclass
class Corpus:
    """A built KD corpus: ``input_ids`` [N, L] int64, ``source_index`` [N] (index into ``sources``)."""

    input_ids: torch.Tensor
    source_index: torch.Tensor
    sources: list[str]
    reports: list[SourceReport]
    config: MixtureConfig
    source_digests: dict[str, str] = field(default_factory=dict)  # documents read per source (before validation)

    @property
    def documents(self) -> int:
        """Distinct source documents whose tokens are in the corpus."""
        return sum(r.documents_used for r in self.reports)

    def digest(self) -> str:
        """Content digest of the token ids (16 hex chars): equal corpora have equal digests."""
        return hashlib.blake2b(self.input_ids.to(torch.int64).numpy().tobytes(), digest_size=8).hexdigest()

    def summary(self) -> dict:
        return {
            "sequences": int(self.input_ids.shape[0]),
            "seq_len": int(self.input_ids.shape[1]),
            "documents": self.documents,
            "digest": self.digest(),
            "source_digests": dict(self.source_digests),
            "sources": [r.as_dict() for r in self.reports],
        }


def corpus_limit(count: int | None) -> int | None:
    """Documents read from a streamed hub source that gives ``count`` samples (a spec's own `@N` wins)."""
    return None if count is None else max(1000, 4 * count)


def build_mixture(cfg: MixtureConfig, tokenizer, log=print, all_sequences: bool = False) -> Corpus:
    """Build the KD corpus: per source, validate all its documents, shuffle them with a seed derived from
    (seed, the source's content digest), and cut document samples (``document_sequences``) until that source's
    share of num_samples is reached; then shuffle the sequences of all sources together. Deterministic for a
    given config, document content and tokenizer — wherever the files lie.

    ``all_sequences``: one source, every sample it gives (``num_samples`` is then ignored).
    """
    weights = [c.weight for c in cfg.components]
    counts: list[int | None] = [None] if all_sequences else split_counts(cfg.num_samples, weights)
    rows: list[list[int]] = []
    index: list[int] = []
    reports: list[SourceReport] = []
    digests: dict[str, str] = {}
    for i, (comp, count) in enumerate(zip(cfg.components, counts)):
        docs = load_documents(comp.source, limit=corpus_limit(count))
        digests[comp.source] = documents_digest(docs)
        good, report = validate_documents(comp.source, docs, cfg.max_bad_fraction)
        rng = np.random.default_rng(_stable_seed(cfg.seed, digests[comp.source]))
        order = rng.permutation(len(good))
        got, used = document_sequences((good[j] for j in order), tokenizer, cfg.seq_len, count,
                                       cfg.max_sequences_per_document, rng)
        rows += got
        index += [i] * len(got)
        report.sequences, report.documents_used, report.tokens = len(got), used, len(got) * cfg.seq_len
        if not got or (count is not None and len(got) < count):
            raise DataQualityError(
                f"data source {comp.source!r} has {len(good)} usable documents (of {len(docs)}); at most "
                f"{cfg.max_sequences_per_document} sequence(s) of {cfg.seq_len} tokens per document they give "
                f"{len(got)} samples, and the corpus needs {count if count is not None else 'at least 1'}: lower "
                "num_samples or seq_len, raise max_sequences_per_document, or add data"
            )
        bad = f", dropped {report.bad_total} bad ({report.bad})" if report.bad_total else ""
        # The source name is quoted: a bare `c4:train:` renders as an emoji in Prefect's console.
        log(f"mixture: {comp.source!r} gives {len(got)} sequences from {used} of {len(good)} documents{bad}")
        reports.append(report)
    order = np.random.default_rng(_stable_seed(cfg.seed, "mixture")).permutation(len(rows))
    input_ids = torch.tensor([rows[j] for j in order], dtype=torch.int64).reshape(len(rows), cfg.seq_len)
    source_index = torch.tensor([index[j] for j in order], dtype=torch.int64)
    return Corpus(input_ids, source_index, [c.source for c in cfg.components], reports, cfg, digests)
