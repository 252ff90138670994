"""Data sources, sample validation and the mixture builder."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from sparsekd_core.config import MixtureComponent, MixtureConfig
from sparsekd_core.data import (
    DataOverlapError,
    DataQualityError,
    check_disjoint,
    build_mixture,
    classify_document,
    load_documents,
    load_text,
    split_counts,
    validate_documents,
    wikitext_articles,
    wikitext_rows_to_raw,
)

# sha256 of the upstream raw WikiText-2 test file (pytorch/examples cf74c81, see resources/README.md).
WIKITEXT2_TEST_SHA256 = "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def prose(i: int, n_words: int = 60) -> str:
    """Distinct, non-repetitive text for document i."""
    g = torch.Generator().manual_seed(i)
    idx = torch.randint(0, len(WORDS), (n_words,), generator=g).tolist()
    return f"Document {i}: " + " ".join(WORDS[j] + str((j * 7 + k) % 13) for k, j in enumerate(idx)) + "."


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_embedded_wikitext_test_is_the_upstream_file():
    text = load_text("wikitext2:test")  # offline in tests: the package copy
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == WIKITEXT2_TEST_SHA256


def test_hub_rows_map_back_to_raw_file():
    raw = " \n = Title = \n \n Some text .\n \n"
    rows = ["", " = Title = \n", "", " Some text .\n", ""]  # how the hub stores those lines
    assert wikitext_rows_to_raw(rows) == raw


def test_wikitext_articles_split_on_top_level_titles():
    raw = " = A = \n a text .\n = = Sub = = \n more .\n = B = \n b text .\n"
    arts = wikitext_articles(raw)
    assert len(arts) == 2 and arts[0].startswith("= A =") and "= = Sub = =" in arts[0] and arts[1].startswith("= B =")


@pytest.mark.parametrize(
    "doc,reason",
    [
        ("", "empty"),
        ("   \n\t  ", "empty"),
        (b"\xff\xfe\x00garbage\xc3", "undecodable"),
        ("text\x00with\x00nuls" * 5, "binary"),
        ("ok", "placeholder"),
        ("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n", "placeholder"),
        ("This file is a placeholder. Download it from the cloud to view its contents.", "placeholder"),
        ("stub " * 400, "repetitive"),
        ("Natalia sold clips to 48 of her friends in April, and then half as many in May.", None),
    ],
)
def test_classify_document(doc, reason):
    assert classify_document(doc) == reason


def test_validation_counts_and_threshold():
    docs = [prose(i) for i in range(95)] + ["", "  ", "stub " * 300, prose(3), b"\xff\xfe"]
    good, report = validate_documents("src", docs, max_bad_fraction=0.05)
    assert len(good) == 95
    assert report.bad == {"duplicate": 1, "empty": 2, "repetitive": 1, "undecodable": 1}
    with pytest.raises(DataQualityError, match=r"'src': 5 of 100 documents are bad .*empty=2"):
        validate_documents("src", docs, max_bad_fraction=0.04)


def test_mixture_fails_on_placeholder_source(tmp_path, tiny_tokenizer):
    # 10% of this source is cloud-sync placeholder stubs: the build must fail and say so.
    texts = [prose(i) for i in range(90)] + ["Placeholder: this file is available online only."] * 10
    src = write_jsonl(tmp_path / "synced.jsonl", texts)
    cfg = MixtureConfig(components=[MixtureComponent(source=str(src), weight=1)], num_samples=4, seq_len=16)
    with pytest.raises(DataQualityError, match=r"synced.jsonl'.*10 of 100 documents are bad.*placeholder="):
        build_mixture(cfg, tiny_tokenizer, log=lambda m: None)


def make_sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [prose(i) for i in range(200)])
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps({"question": prose(1000 + i, 20), "answer": "#### 4"}) + "\n" for i in range(200)))
    c = tmp_path / "c.txt"
    c.write_text("\n\n".join(prose(5000 + i) for i in range(200)))
    return [str(a), str(b), str(c)]


def test_mixture_is_deterministic_with_exact_proportions(tmp_path, tiny_tokenizer):
    sources = make_sources(tmp_path)
    comps = [MixtureComponent(source=s, weight=w) for s, w in zip(sources, (0.5, 0.3, 0.2))]
    cfg = MixtureConfig(components=comps, num_samples=50, seq_len=32, seed=7)
    quiet = lambda m: None  # noqa: E731
    first = build_mixture(cfg, tiny_tokenizer, log=quiet)
    again = build_mixture(cfg, tiny_tokenizer, log=quiet)
    assert first.input_ids.shape == (50, 32)
    assert torch.equal(first.input_ids, again.input_ids) and first.digest() == again.digest()
    assert torch.bincount(first.source_index, minlength=3).tolist() == [25, 15, 10]
    assert [r.sequences for r in first.reports] == [25, 15, 10]
    other = build_mixture(cfg.model_copy(update={"seed": 8}), tiny_tokenizer, log=quiet)
    assert not torch.equal(first.input_ids, other.input_ids)
    # Each sequence is a run of its own source's text (documents separated by EOS).
    for i, source in enumerate(sources):
        whole = "\n".join(load_documents(source))
        for row in first.input_ids[first.source_index == i]:
            assert all(piece in whole for piece in tiny_tokenizer.decode(row).split("</s>"))


def test_samples_are_documents_with_random_offsets(tmp_path, tiny_tokenizer):
    """Paper: a sample is a document. Long documents give one window each (at a seeded random offset), so N
    samples come from N distinct documents; max_sequences_per_document raises the cap."""
    docs = [prose(i, 80) for i in range(40)]  # each far longer than 32 tokens
    src = write_jsonl(tmp_path / "long.jsonl", docs)
    cfg = MixtureConfig(components=[MixtureComponent(source=str(src), weight=1)], num_samples=20, seq_len=32)
    corpus = build_mixture(cfg, tiny_tokenizer, log=lambda m: None)
    owners = []
    for row in corpus.input_ids:
        text = tiny_tokenizer.decode(row)
        found = [i for i, d in enumerate(docs) if text.replace("</s>", "") in d + ""]
        assert len(found) == 1, text  # a window lies inside exactly one document
        owners.append(found[0])
    assert len(set(owners)) == 20 and corpus.documents == 20
    offsets = {docs[o].index(tiny_tokenizer.decode(row).replace("</s>", "")) for o, row in zip(owners, corpus.input_ids)}
    assert len(offsets) > 10  # random offsets, not every window at its document's start
    triple = build_mixture(cfg.model_copy(update={"max_sequences_per_document": 3, "num_samples": 30}),
                           tiny_tokenizer, log=lambda m: None)
    assert triple.documents == 10 and triple.summary()["documents"] == 10


def test_short_documents_start_samples_and_keep_question_with_answer(tmp_path, tiny_tokenizer):
    b = tmp_path / "gsm.jsonl"
    b.write_text("".join(json.dumps({"question": f"Q{i}: how many {WORDS[i % 19]}s and {WORDS[(i * 7) % 19]}s?",
                                     "answer": f"#### {i}"}) + "\n" for i in range(60)))
    cfg = MixtureConfig(components=[MixtureComponent(source=str(b), weight=1)], num_samples=6, seq_len=96)
    corpus = build_mixture(cfg, tiny_tokenizer, log=lambda m: None)
    for row in corpus.input_ids:
        first_doc = tiny_tokenizer.decode(row).split("</s>")[0]
        assert first_doc.startswith("Q") and "\n#### " in first_doc  # starts at a document, whole
    assert corpus.documents > 6  # short documents are continued by the next ones


def test_corpus_depends_on_content_and_seed_not_path(tmp_path, tiny_tokenizer):
    texts = [prose(i, 80) for i in range(30)]
    a = write_jsonl(tmp_path / "a.jsonl", texts)
    (tmp_path / "elsewhere").mkdir()
    b = write_jsonl(tmp_path / "elsewhere" / "copy.jsonl", texts)
    quiet = lambda m: None  # noqa: E731

    def build(src, seed=0):
        cfg = MixtureConfig(components=[MixtureComponent(source=str(src), weight=1)], num_samples=10, seq_len=32,
                            seed=seed)
        return build_mixture(cfg, tiny_tokenizer, log=quiet)

    assert build(a).digest() == build(b).digest()
    assert build(a).digest() != build(a, seed=1).digest()
    c = write_jsonl(tmp_path / "edited.jsonl", texts[:-1] + [prose(999, 80)])
    assert build(c).digest() != build(a).digest()


def test_mixture_not_enough_data(tmp_path, tiny_tokenizer):
    src = write_jsonl(tmp_path / "small.jsonl", [prose(i, 80) for i in range(5)])
    cfg = MixtureConfig(components=[MixtureComponent(source=str(src), weight=1)], num_samples=10, seq_len=32)
    with pytest.raises(DataQualityError, match=r"has 5 usable documents \(of 5\).*give 5 samples.*needs 10"):
        build_mixture(cfg, tiny_tokenizer, log=lambda m: None)


def test_split_counts_sums_exactly():
    for total in (1, 7, 50, 50000):
        counts = split_counts(total, [0.30, 0.25, 0.25, 0.20])
        assert sum(counts) == total
    assert split_counts(50000, [0.30, 0.25, 0.25, 0.20]) == [15000, 12500, 12500, 10000]


def test_offline_named_sources_and_file_formats(tmp_path):
    assert len(load_documents("gsm8k:train")) == 4000
    c4_train, c4_heldout, c4_val = load_documents("c4:train"), load_documents("c4:heldout"), load_documents("c4:val")
    assert (len(c4_train), len(c4_heldout), len(c4_val)) == (900, 80, 20)
    assert not set(c4_train) & set(c4_heldout) and not set(c4_train) & set(c4_val) and not set(c4_val) & set(c4_heldout)
    stdlib = load_documents("python:stdlib")
    assert len(stdlib) > 100
    # Held-out code: other modules of the same stdlib, sharing no document or block with python:stdlib.
    code_heldout = load_documents("python:heldout")
    assert 10 <= len(code_heldout) < len(stdlib) / 5 and not set(code_heldout) & set(stdlib)
    assert check_disjoint({"code": "python:heldout"}, {"python:stdlib": None})["shared"] == 0
    assert load_text("python:heldout").startswith(code_heldout[0].decode())  # an eval text, not an empty string
    with pytest.raises(DataOverlapError):  # the check is live: stdlib against itself is refused
        check_disjoint({"code": "python:stdlib"}, {"python:stdlib": None})
    import pyarrow as pa  # pinned in requirements.lock
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["first document text here", "second document text here"]}), tmp_path / "d.parquet")
    assert load_documents(str(tmp_path / "d.parquet")) == ["first document text here", "second document text here"]
    assert load_text(str(tmp_path / "d.parquet")) == "first document text here\n\nsecond document text here"


def test_offline_hub_only_source_is_a_clear_error():
    from sparsekd_core.config import check_data_spec
    from sparsekd_core.data import DataUnavailableError

    with pytest.raises(DataUnavailableError, match="hub:codeparrot:train.*not reachable"):
        load_documents("hub:codeparrot:train")
    with pytest.raises(DataUnavailableError, match="no packaged copy.*'hub:codeparrot:train'"):
        load_documents("codeparrot:train")
    with pytest.raises(ValueError, match="no packaged copy.*'hub:codeparrot:train'"):
        check_data_spec("codeparrot:train")
    assert len(load_documents("gsm8k:test")) == 1319  # packaged, complete
    with pytest.raises(ValueError, match="document limit"):
        check_data_spec("hub:c4:train@many")


def test_a_name_means_the_packaged_bytes_and_the_hub_only_when_asked(monkeypatch):
    """No network probe decides what a name means: `c4:heldout` is the packaged copy even when the hub is up;
    `hub:c4:heldout` streams the hub's validation split with a recorded document limit."""
    import sparsekd_core.data as data
    import sparsekd_core.models as models

    packaged = load_documents("c4:heldout")
    calls = []
    monkeypatch.setattr(models, "hub_reachable", lambda *a, **k: True)
    monkeypatch.setattr(data, "_hub_rows", lambda *a: calls.append(a) or [f"hub doc {i} " * 5 for i in range(3)])
    assert load_documents("c4:heldout") == packaged
    assert hashlib.sha256(load_text("wikitext2:test").encode()).hexdigest() == WIKITEXT2_TEST_SHA256
    assert calls == []  # no hub row was read for a name
    assert load_documents("hub:c4:heldout")[0].startswith("hub doc 0")
    assert calls[-1] == ("allenai/c4", "en", "validation", "text", data.HUB_STREAM_LIMIT)
    load_documents("hub:c4:heldout@50")
    assert calls[-1][-1] == 50
    assert data.source_digest("c4:heldout") != data.source_digest("hub:c4:heldout")


def test_paper_offline_mixture_sources_are_clean():
    """The shipped calibration data and the stdlib code domain pass validation under the default threshold."""
    for source in ("c4:train", "wikitext2:train", "gsm8k:train", "python:stdlib"):
        good, report = validate_documents(source, load_documents(source), max_bad_fraction=0.05)
        assert report.bad_total <= 0.05 * report.documents
        assert len(good) > 30


def test_check_disjoint_finds_documents_and_paragraphs_across_formats(tmp_path):
    from sparsekd_core.data import DataOverlapError, check_disjoint

    corpus = write_jsonl(tmp_path / "corpus.jsonl", [prose(i) + "\n\n" + prose(100 + i) for i in range(5)])
    held_out = tmp_path / "held.txt"
    held_out.write_text("\n\n".join(prose(200 + i) for i in range(4)))
    assert check_disjoint({"held": str(held_out)}, {str(corpus): None}) == \
        {"eval_documents": 4, "corpus_documents": 5, "shared": 0}
    leaky = tmp_path / "leaky.txt"  # one paragraph of a two-paragraph corpus document, in another format
    leaky.write_text(prose(300) + "\n\n" + prose(102))
    with pytest.raises(DataOverlapError, match="eval set 'leaky'.*shares 1 document"):
        check_disjoint({"leaky": str(leaky)}, {str(corpus): None})
    # The packaged held-out sets are disjoint from the packaged corpus sources, paragraph by paragraph.
    check_disjoint({"wikitext2": "wikitext2:test", "c4_heldout": "c4:heldout", "valid": "wikitext2:valid"},
                   {"c4:train": None, "wikitext2:train": None, "gsm8k:train": None})
