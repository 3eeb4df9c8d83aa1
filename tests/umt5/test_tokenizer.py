"""Tokenizer: Wan's cleaning, EOS appended, truncation and padding to max_length, numpy out.

The tokenizer under test is a tiny Unigram model trained with `tokenizers` and saved as a
transformers T5Tokenizer (pad 0, EOS 1, like google/umt5-xxl) by conftest.save_tiny_tokenizer;
nothing is downloaded. Ours reads its tokenizer.json with `tokenizers` alone; transformers
(test extra) only writes the files and is the reference.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from fpsa_jax.model.umt5 import Tokenizer, clean_text
from tests.umt5.conftest import SENTENCES, save_tiny_tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture()
def no_ftfy(monkeypatch):
    monkeypatch.setitem(sys.modules, "ftfy", None)  # import ftfy now raises ImportError


def _make(path, max_length):
    with pytest.warns(UserWarning, match="ftfy is not installed"):
        return Tokenizer(path, max_length=max_length)


def test_ids_are_the_tokens_then_eos_then_pad(tokenizer_dir, no_ftfy):
    tok = _make(tokenizer_dir, 40)
    reference = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = ["a cat sits", "the dog runs in the park"]
    ids, mask = tok(texts)
    assert ids.dtype == mask.dtype == np.int32 and ids.shape == mask.shape == (2, 40)
    assert (tok.pad_id, tok.eos_id) == (0, 1)
    for row, row_mask, text in zip(ids, mask, texts, strict=True):
        pieces = reference.encode(text, add_special_tokens=False)
        expected = pieces + [1] + [0] * (40 - len(pieces) - 1)
        assert row.tolist() == expected
        assert row_mask.tolist() == [1] * (len(pieces) + 1) + [0] * (40 - len(pieces) - 1)


def test_long_text_is_truncated_with_eos_last(tokenizer_dir, no_ftfy):
    ids, mask = _make(tokenizer_dir, 5)(" ".join(SENTENCES))
    assert ids.shape == (1, 5) and mask.tolist() == [[1] * 5]
    assert ids[0, -1] == 1


def test_text_is_cleaned_before_tokenizing(tokenizer_dir, no_ftfy):
    tok = _make(tokenizer_dir, 64)
    messy = tok(["  fish &amp;amp; chips \n\t on a   plate "])
    np.testing.assert_array_equal(messy[0], tok(["fish & chips on a plate"])[0])


def test_clean_text_without_ftfy_unescapes_twice_and_collapses_whitespace(no_ftfy):
    assert clean_text("  a &amp;lt;b&amp;gt;\n\n c\t ") == "a <b> c"
    assert clean_text("caf\u00c3\u00a9") == "caf\u00c3\u00a9"  # mojibake is left alone


def test_clean_text_uses_ftfy_when_installed(monkeypatch):
    fake = types.ModuleType("ftfy")
    fake.fix_text = lambda text: text.replace("\u00c3\u00a9", "\u00e9")
    monkeypatch.setitem(sys.modules, "ftfy", fake)
    assert clean_text(" caf\u00c3\u00a9  au lait ") == "caf\u00e9 au lait"


@pytest.mark.parametrize("max_length", [1, 4, 7, 64])
def test_matches_transformers_padding_and_truncation_without_importing_it(
    tokenizer_dir, no_ftfy, monkeypatch, max_length
):
    texts = ["a cat sits on the mat", "the dog runs in the park and the cat", "", "fish"]
    reference = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)(
        texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="np"
    )
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    ids, mask = _make(tokenizer_dir, max_length)(texts)
    np.testing.assert_array_equal(ids, reference["input_ids"])
    np.testing.assert_array_equal(mask, reference["attention_mask"])


def test_missing_tokenizers_is_a_clear_import_error(tokenizer_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match="needs the `tokenizers` package, a dependency"):
        Tokenizer(tokenizer_dir)


def test_a_directory_without_tokenizer_json_says_what_it_holds(tmp_path):
    (tmp_path / "spiece.model").write_bytes(b"x")
    with pytest.raises(
        FileNotFoundError, match=r"has no tokenizer.json .*found \['spiece.model'\]"
    ):
        Tokenizer(tmp_path)


def test_pad_and_eos_come_from_the_tokenizer_config(tokenizer_dir, tmp_path, no_ftfy):
    folder = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, folder)
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "</s>"}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<unk>"}))
    tok = _make(folder, 8)
    assert (tok.pad_id, tok.eos_id) == (1, 2)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(ValueError, match="has no token '<nope>'"):
        Tokenizer(folder)


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found"):
        Tokenizer(tmp_path / "umt5-xxl")


def test_max_length_below_one_is_rejected(tokenizer_dir):
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        Tokenizer(tokenizer_dir, max_length=0)


def test_encoder_module_imports_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None; "
        "import fpsa_jax.model.umt5 as m; print(m.UMT5Config.preset('tiny').d_model)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[2],
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "32"
