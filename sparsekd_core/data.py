"""Text sources, sample validation and the KD-corpus mixture builder.

A data spec is one of
  * a named source ``family:split`` (see ``config.NAMED_SOURCES``): the hub dataset when the hub is reachable,
    else the copy shipped in ``sparsekd_core/resources`` (or, for ``python:stdlib``, the interpreter's own
    standard-library source);
  * a local file: ``.txt``/``.raw`` (read whole), ``.jsonl``/``.json`` (a ``text`` field, or GSM8K's
    ``question`` + ``answer``), ``.parquet`` (same columns), or a directory of such files / ``.py`` files;
  * a named mixture (``mix:paper``, ``mix:paper-offline``) — only where a corpus is built.

Every document that goes into a corpus is validated first (``classify_document``). Bad documents are dropped
and counted per source and reason; a source with more than ``max_bad_fraction`` bad documents fails the build,
so a corpus silently made of placeholder files (which once happened to the paper's authors) cannot be built.
"""

from __future__ import annotations

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
from typing import Iterable, Iterator

import numpy as np
import torch

from .config import NAMED_SOURCES, ConfigError, MixtureConfig


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
    for key in ("text", "content", "code"):
        if key in record:
            value = record[key]
            return value if isinstance(value, str) else ""
    raise ConfigError(f"data: {where}: records need a 'text' (or 'content') field, or 'question' + 'answer'")


def _stdlib_documents(min_bytes: int = 1024) -> list[str | bytes]:
    """Python's standard-library modules (>= 1 KB, no test suites), as raw bytes, in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}
    files = sorted(
        p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts) and p.stat().st_size >= min_bytes
    )
    return [p.read_bytes() for p in files]


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


# (hub path, config, split, column or None for the whole record) for the named sources.
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
_STREAMED = {"c4:train", "c4:heldout", "codeparrot:train"}  # too large to download whole
_C4_HELDOUT_START = 900  # embedded C4 sample: documents [0, 900) are train, [900, 1000) held out


def _use_hub(name: str) -> bool:
    from .models import hub_reachable

    return name in _HUB and hub_reachable()


def _named_documents(name: str, limit: int | None) -> list[str | bytes]:
    if name == "python:stdlib":
        return _stdlib_documents()
    if _use_hub(name):
        path, cfg, split, column = _HUB[name]
        rows = _hub_rows(path, cfg, split, column, limit if name in _STREAMED else None)
        if name.startswith("wikitext2:"):
            return wikitext_articles(wikitext_rows_to_raw(rows))
        if name.startswith("gsm8k:"):
            return [gsm8k_text(r) for r in rows]
        return rows
    # Offline: the copies shipped inside the package.
    if name.startswith("wikitext2:"):
        return wikitext_articles(_embedded_wikitext(name))
    if name == "gsm8k:train":
        return [gsm8k_text(r) for r in _read_jsonl_gz("gsm8k-train-sample.jsonl.gz")]
    if name in ("c4:train", "c4:heldout"):
        docs = [r["text"] for r in _read_jsonl_gz("c4-en-train-sample.jsonl.gz")]
        return docs[:_C4_HELDOUT_START] if name == "c4:train" else docs[_C4_HELDOUT_START:]
    raise DataUnavailableError(
        f"data source {name!r} needs the Hugging Face hub, which is not reachable here; offline, use "
        "a local file or one of: wikitext2:test, wikitext2:valid, wikitext2:train, gsm8k:train, c4:train, "
        "c4:heldout, python:stdlib"
    )


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

    ``limit`` caps how many rows are read from streamed hub sources (C4, CodeParrot); local sources are read whole.
    """
    if spec in NAMED_SOURCES:
        return _named_documents(spec, limit)
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

    ``wikitext2:*`` gives the original raw file text (identical whether it came from the hub or the package copy);
    a ``.jsonl``/``.parquet`` file gives its documents joined by blank lines.
    """
    if spec.startswith("mix:"):
        raise ConfigError(f"data.data={spec!r}: a mixture cannot be evaluated; give a single source or a file")
    if spec in NAMED_SOURCES and spec.startswith("wikitext2:"):
        if _use_hub(spec):
            path, cfg, split, column = _HUB[spec]
            return wikitext_rows_to_raw(_hub_rows(path, cfg, split, column, None))
        return _embedded_wikitext(spec)
    path = Path(spec).expanduser()
    if spec not in NAMED_SOURCES and path.is_file() and path.suffix.lower() in (".txt", ".raw"):
        raw = path.read_bytes()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"data.data={spec!r}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    docs = [d for d in load_documents(spec) if isinstance(d, str) and d.strip()]
    return "\n\n".join(docs)


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


def pack_sequences(docs: Iterable[str], tokenizer, seq_len: int, count: int) -> Iterator[tuple[list[int], int]]:
    """Tokenize documents in order (each followed by EOS) and cut the stream into `count` sequences of seq_len.

    Yields (token ids, number of documents started so far). Stops as soon as `count` sequences are out.
    """
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    buffer: list[int] = []
    produced = 0
    docs_started = 0
    for doc in docs:
        if produced >= count:
            return
        docs_started += 1
        buffer.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if sep is not None:
            buffer.append(sep)
        while len(buffer) >= seq_len and produced < count:
            yield buffer[:seq_len], docs_started
            buffer = buffer[seq_len:]
            produced += 1


@dataclass
class Corpus:
    """A built KD corpus: ``input_ids`` [N, L] int64, ``source_index`` [N] (index into ``sources``)."""

    input_ids: torch.Tensor
    source_index: torch.Tensor
    sources: list[str]
    reports: list[SourceReport]
    config: MixtureConfig

    def digest(self) -> str:
        """Content digest of the token ids (16 hex chars): equal corpora have equal digests."""
        return hashlib.blake2b(self.input_ids.to(torch.int64).numpy().tobytes(), digest_size=8).hexdigest()

    def summary(self) -> dict:
        return {
            "sequences": int(self.input_ids.shape[0]),
            "seq_len": int(self.input_ids.shape[1]),
            "digest": self.digest(),
            "sources": [r.as_dict() for r in self.reports],
        }


def build_mixture(cfg: MixtureConfig, tokenizer, log=print) -> Corpus:
    """Build the KD corpus: per source, validate all its documents, shuffle them with a seed derived from
    (seed, source), pack into seq_len-token sequences until that source's share of num_samples is reached;
    then shuffle the sequences of all sources together. Deterministic for a given config, data and tokenizer."""
    weights = [c.weight for c in cfg.components]
    counts = split_counts(cfg.num_samples, weights)
    rows: list[list[int]] = []
    index: list[int] = []
    reports: list[SourceReport] = []
    for i, (comp, count) in enumerate(zip(cfg.components, counts)):
        # Streamed hub sources: read a generous number of rows (documents are usually longer than one sequence).
        docs = load_documents(comp.source, limit=max(1000, 4 * count))
        good, report = validate_documents(comp.source, docs, cfg.max_bad_fraction)
        order = np.random.default_rng(_stable_seed(cfg.seed, comp.source)).permutation(len(good))
        used = 0
        for ids, used in pack_sequences((good[j] for j in order), tokenizer, cfg.seq_len, count):
            rows.append(ids)
            index.append(i)
            report.sequences += 1
        report.documents_used, report.tokens = used, report.sequences * cfg.seq_len
        if report.sequences < count:
            raise DataQualityError(
                f"data source {comp.source!r} yields only {report.sequences} sequences of {cfg.seq_len} tokens "
                f"from {len(good)} good documents; the mixture needs {count}: lower num_samples or seq_len, "
                "or add data"
            )
        bad = f", dropped {report.bad_total} bad ({report.bad})" if report.bad_total else ""
        log(f"mixture: {comp.source}: {count} sequences from {used} of {len(good)} documents{bad}")
        reports.append(report)
    order = np.random.default_rng(_stable_seed(cfg.seed, "mixture")).permutation(len(rows))
    input_ids = torch.tensor([rows[j] for j in order], dtype=torch.int64).reshape(len(rows), cfg.seq_len)
    source_index = torch.tensor([index[j] for j in order], dtype=torch.int64)
    return Corpus(input_ids, source_index, [c.source for c in cfg.components], reports, cfg)
