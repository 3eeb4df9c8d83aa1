"""Our torch-free safetensors reader agrees with the safetensors library and stays lazy."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fpsa_jax.convert.errors import CheckpointError
from fpsa_jax.convert.safetensors_io import SafetensorsReader, read_header


def test_reader_matches_the_safetensors_library_for_every_dtype(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "bf16": rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16),
        "f16": rng.standard_normal((2, 3, 4)).astype(np.float16),
        "f32": rng.standard_normal((7,)).astype(np.float32),
        "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "scalar": np.array(3.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    reference = load_file(str(path))
    with SafetensorsReader.from_files([path]) as reader:
        assert set(reader) == set(tensors)
        for name, ref in reference.items():
            got = reader.read(name)
            assert got.dtype == ref.dtype and got.shape == ref.shape == reader.shape(name)
            np.testing.assert_array_equal(
                got.reshape(-1).view(np.uint8), ref.reshape(-1).view(np.uint8)
            )


def test_reads_are_read_only_views_of_a_memory_map(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"w": np.ones((4, 4), np.float32)}, str(path))
    with SafetensorsReader.from_files([path]) as reader:
        w = reader.read("w")
        assert isinstance(w.base, np.ndarray) and not w.flags.writeable
        assert w.base.base is not None  # a view into the file mapping, not a copy
        with pytest.raises(ValueError):
            w[0, 0] = 2.0


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x01\x02", "shorter than 8 bytes"),
        ((10**9).to_bytes(8, "little") + b"{}", "does not fit"),
        ((4).to_bytes(8, "little") + b"nope", "bad JSON header"),
        ((2).to_bytes(8, "little") + b"[]", "not a JSON object"),
    ],
)
def test_files_that_are_not_safetensors_are_rejected(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        read_header(path)


def test_header_with_unknown_dtype_or_inconsistent_offsets_is_rejected(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"w": np.ones((2, 2), np.float32)}, str(path))
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b'"F32"', b'"C64"'))
    with pytest.raises(CheckpointError, match="unsupported or malformed.*'w'"):
        read_header(path)
    path.write_bytes(raw.replace(b"[2,2]", b"[2,3]"))
    with pytest.raises(CheckpointError, match="'w' of shape \\(2, 3\\).*does not match"):
        read_header(path)


def test_a_truncated_file_is_called_truncated(tmp_path):
    """Before: "has a byte range [0, 16) that does not match", for a file cut short by an
    interrupted download."""
    path = tmp_path / "t.safetensors"
    save_file({"a": np.ones(4, np.float32), "w": np.ones((2, 2), np.float32)}, str(path))
    raw = path.read_bytes()
    path.write_bytes(raw[:-3])
    with pytest.raises(CheckpointError) as e:
        read_header(path)
    assert str(e.value) == (
        f"{path} is truncated: tensor 'w' ends at byte {len(raw)} but the file has "
        f"{len(raw) - 3} bytes (an interrupted download or copy?)"
    )


def test_same_tensor_in_two_unindexed_files_is_rejected(tmp_path):
    for name in ("a", "b"):
        save_file({"w": np.ones(2, np.float32)}, str(tmp_path / f"{name}.safetensors"))
    with pytest.raises(CheckpointError, match="'w' appear in more than one file"):
        SafetensorsReader.from_files([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
