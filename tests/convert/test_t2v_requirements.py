"""check_t2v_directory: every file and package loading a model directory needs, before any
weight is read (the files here are empty: nothing is read)."""

from __future__ import annotations

import sys
import zipfile

import pytest

from fpsa_jax.convert import check_t2v_directory
from fpsa_jax.convert.t2v import requirements


def _original_dir(root, tokenizer_json=True):
    root.mkdir()
    (root / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    for name in ("Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth"):
        with zipfile.ZipFile(root / name, "w") as z:  # torch.save's format
            z.writestr("archive/data.pkl", b"")
    tokenizer = root / "google" / "umt5-xxl"
    tokenizer.mkdir(parents=True)
    if tokenizer_json:
        (tokenizer / "tokenizer.json").write_text("{}")
    return root


def test_a_complete_directory_needs_only_tokenizers(tmp_path):
    files = check_t2v_directory(_original_dir(tmp_path / "m"))
    assert [r.module for r in requirements(files)] == ["tokenizers"]


def test_a_tokenizer_folder_without_tokenizer_json_is_named(tmp_path):
    root = _original_dir(tmp_path / "m", tokenizer_json=False)
    with pytest.raises(FileNotFoundError, match=r"umt5-xxl has no tokenizer.json"):
        check_t2v_directory(root)


def test_every_missing_package_is_named_with_its_file(tmp_path, monkeypatch):
    root = _original_dir(tmp_path / "m")
    (root / "Wan2.1_VAE.pth").write_bytes(b"legacy pickle")  # not a zip: needs torch
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError) as e:
        check_t2v_directory(root)
    assert str(e.value) == (
        f"loading this model needs tokenizers for {root}/google/umt5-xxl/tokenizer.json "
        f"(pip install tokenizers); torch for {root}/Wan2.1_VAE.pth "
        "(pip install 'fpsa-jax[convert]')"
    )
