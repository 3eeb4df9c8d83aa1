"""TorchReader reads torch.save's zip format without torch, bit for bit what torch.load gives,
and refuses anything in the pickle that is not a state dict of tensors."""

from __future__ import annotations

import os
import pickle
import sys
import zipfile
from collections import OrderedDict

import ml_dtypes
import numpy as np
import pytest

from fpsa_jax.convert import CheckpointError
from fpsa_jax.convert.torch_io import TorchReader, needs_torch

torch = pytest.importorskip("torch")  # to write the files; reading blocks it


def _as_numpy(t) -> np.ndarray:
    t = t.detach()
    views = {torch.bfloat16: ml_dtypes.bfloat16, torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn}
    if t.dtype in views:
        bits = torch.int16 if t.dtype == torch.bfloat16 else torch.uint8
        return t.contiguous().view(bits).numpy().view(views[t.dtype])
    return t.numpy()


def _state():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, generator=gen)
    return OrderedDict(
        w=a,
        transposed=a.t(),  # shares a's storage, other strides
        corner=a[1:, 2:],  # an offset into it
        bf16=torch.randn(5, generator=gen).to(torch.bfloat16),
        fp16=torch.randn(2, 3, generator=gen).half(),
        fp8=torch.randn(4, generator=gen).to(torch.float8_e4m3fn),  # _rebuild_tensor_v3
        param=torch.nn.Parameter(torch.randn(2, generator=gen)),
        ints=torch.arange(6).reshape(2, 3),
        flags=torch.tensor([True, False]),
        scalar=torch.tensor(3.5),
        empty=torch.zeros(0, 3),
    )


@pytest.mark.parametrize("wrapped", [False, True])
def test_every_tensor_reads_as_torch_load_gives_it_without_torch(tmp_path, wrapped, monkeypatch):
    state = _state()
    module = torch.nn.Linear(2, 3)  # state_dict() carries _metadata on the OrderedDict
    state.update({f"linear.{k}": v for k, v in module.state_dict().items()})
    path = tmp_path / "model.pth"
    torch.save({"state_dict": state} if wrapped else state, path)
    expected = {k: _as_numpy(v) for k, v in state.items()}
    monkeypatch.setitem(sys.modules, "torch", None)
    assert not needs_torch(path)
    with TorchReader(path) as reader:
        assert list(reader) == list(expected)
        for name, want in expected.items():
            got = reader.read(name)
            assert reader.shape(name) == want.shape
            assert got.dtype == want.dtype and got.shape == want.shape, name
            bits = [np.ascontiguousarray(x).view(np.uint8) for x in (got, want)]
            np.testing.assert_array_equal(*bits, err_msg=name)
            assert not got.flags.writeable


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize(
    "payload, refused",
    [(_Evil(), "posix.system"), ({"w": print}, "__builtin__.print")],
)
def test_globals_other_than_a_state_dicts_are_refused_unrun(
    tmp_path, payload, refused, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps(payload, protocol=2))
    with pytest.raises(CheckpointError, match=rf"refused to load {refused}: only state dicts"):
        TorchReader(path)
    assert not (tmp_path / "pwned").exists()


def test_a_truncated_storage_is_called_truncated(tmp_path, monkeypatch):
    path, cut = tmp_path / "model.pth", tmp_path / "cut.pth"
    torch.save({"w": torch.ones(64)}, path)
    monkeypatch.setitem(sys.modules, "torch", None)
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(cut, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, data[:100] if info.filename.endswith("data/0") else data)
    with TorchReader(cut) as reader, pytest.raises(CheckpointError, match="truncated or corrupt"):
        reader.read("w")


def test_a_zip_that_torch_did_not_write_is_named(tmp_path):
    path = tmp_path / "model.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint: no ARCHIVE/data"):
        TorchReader(path)


def test_the_legacy_format_needs_torch_and_reads_with_it(tmp_path, monkeypatch):
    path = tmp_path / "old.pth"
    torch.save({"w": torch.arange(4.0)}, path, _use_new_zipfile_serialization=False)
    assert needs_torch(path)
    with TorchReader(path) as reader:
        np.testing.assert_array_equal(reader.read("w"), np.arange(4.0, dtype=np.float32))
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(CheckpointError, match=r"legacy format needs torch .*fpsa-jax\[convert\]"):
        TorchReader(path)
