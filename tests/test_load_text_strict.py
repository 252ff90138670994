"""An evaluation text is scored exactly as it is on disk: `load_text` never replaces a byte it cannot decode, it
fails naming the file and the byte offset (the corpus guard's DataQualityError)."""

from __future__ import annotations

import json
import re

import pytest

from sparsekd_core.data import DataQualityError, load_text

GOOD = "A paragraph of evaluation text, long enough to be a document of its own. "
BAD_BYTE = b"\xe9"  # "é" in Latin-1: not UTF-8 on its own


def test_a_text_file_that_is_not_utf8_is_refused_with_file_and_offset(tmp_path):
    raw = GOOD.encode() + b"caf" + BAD_BYTE + b" au lait\n"
    path = tmp_path / "eval.txt"
    path.write_bytes(raw)
    with pytest.raises(DataQualityError) as err:
        load_text(str(path))
    message = str(err.value)
    assert repr(str(path)) in message and f"byte offset {raw.index(BAD_BYTE)}" in message
    assert "0xe9" in message and "UTF-8" in message


def test_a_code_file_in_a_directory_is_refused_not_replaced(tmp_path):
    """Files of a directory are read as bytes (code): the bad one is named, with its offset in that file."""
    (tmp_path / "a_good.py").write_text("def first():\n    return 'a module of plain UTF-8 source code'\n" * 3)
    bad = b"# -*- coding: latin-1 -*-\n" + b"NAME = 'Ren" + BAD_BYTE + b"e'\n" + b"def f():\n    return NAME\n" * 3
    (tmp_path / "b_latin1.py").write_bytes(bad)
    with pytest.raises(DataQualityError, match=re.escape("b_latin1.py' is not UTF-8")) as err:
        load_text(str(tmp_path))
    assert f"byte offset {bad.index(BAD_BYTE)}" in str(err.value)
    assert "\ufffd" not in str(err.value)


def test_an_undecodable_jsonl_line_is_refused_at_its_offset_in_the_file(tmp_path):
    good_line = json.dumps({"text": GOOD}).encode()
    bad_line = b'{"text": "caf' + BAD_BYTE + b'"}'
    raw = good_line + b"\n" + bad_line + b"\n"
    (tmp_path / "eval.jsonl").write_bytes(raw)
    with pytest.raises(DataQualityError) as err:
        load_text(str(tmp_path / "eval.jsonl"))
    assert "eval.jsonl" in str(err.value) and f"byte offset {raw.index(BAD_BYTE)}" in str(err.value)


def test_utf8_text_is_returned_unchanged(tmp_path):
    text = GOOD + "café, naïve, 数学, emoji 🙂\n"
    (tmp_path / "eval.txt").write_text(text, encoding="utf-8")
    assert load_text(str(tmp_path / "eval.txt")) == text
    (tmp_path / "code").mkdir()
    source = "s = 'naïve 数学'\n" + "def f():\n    return s\n" * 5
    (tmp_path / "code" / "m.py").write_text(source, encoding="utf-8")
    assert load_text(str(tmp_path / "code")) == source  # one file: its bytes, decoded


@pytest.mark.parametrize("spec", ["wikitext2:test", "wikitext2:valid", "wikitext2:train", "gsm8k:test",
                                  "gsm8k:train", "c4:train", "c4:heldout", "python:stdlib", "python:heldout"])
def test_every_packaged_source_is_valid_utf8(spec):
    assert load_text(spec).strip()
