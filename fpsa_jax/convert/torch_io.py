"""Reading `.pth` / `.pt` state dicts without torch.

`torch.save` (torch >= 1.6) writes a zip archive: `ARCHIVE/data.pkl` is a pickle of the state
dict whose tensors refer, through pickle persistent ids, to raw little-endian storages stored
uncompressed as `ARCHIVE/data/KEY`. We unpickle with an Unpickler that admits only the globals
a state dict is made of (OrderedDict, torch's tensor/parameter rebuild functions, storage types
and dtypes, each mapped to a stand-in here: nothing of torch is imported or called, and any other
global is refused), and hand out each tensor as a read-only NumPy view of the memory-mapped
archive (bfloat16 and float8 as ml_dtypes). Files in the legacy (pre-zip) format are read with
torch when it is installed (`pip install 'fpsa-jax[convert]'`); `needs_torch` tells them apart.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from fpsa_jax.convert.errors import CheckpointError

# Trainers often wrap the state dict one level deep under one of these names.
_WRAPPER_KEYS = ("state_dict", "model", "module")

_BF16, _E4M3, _E5M2 = (np.dtype(t) for t in (ml_dtypes.bfloat16, "float8_e4m3fn", "float8_e5m2"))
# torch dtype names (`torch.float32`, pickled by `_rebuild_tensor_v3`) -> numpy dtypes.
_DTYPES = {
    "float64": np.dtype("<f8"),
    "double": np.dtype("<f8"),
    "float32": np.dtype("<f4"),
    "float": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "half": np.dtype("<f2"),
    "bfloat16": _BF16,
    "float8_e4m3fn": _E4M3,
    "float8_e5m2": _E5M2,
    "int64": np.dtype("<i8"),
    "long": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int": np.dtype("<i4"),
    "int16": np.dtype("<i2"),
    "short": np.dtype("<i2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "uint16": np.dtype("<u2"),
    "uint32": np.dtype("<u4"),
    "uint64": np.dtype("<u8"),
    "bool": np.dtype("?"),
}
# Legacy typed storages (`torch.FloatStorage`, pickled by `_rebuild_tensor_v2`) -> dtypes.
_STORAGES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}
_ZIP_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # the 30 bytes before a member's name


@dataclasses.dataclass(frozen=True)
class _DType:
    """Stand-in for a torch dtype, or for a storage type (typed: its dtype; untyped: bytes)."""

    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _Storage:
    key: str
    dtype: np.dtype  # uint8 for an UntypedStorage


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """Where a tensor lives: its storage, element offset, shape and strides (in elements)."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: np.dtype


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    return _Tensor(storage, int(offset), tuple(size), tuple(stride), storage.dtype)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    return _Tensor(storage, int(offset), tuple(size), tuple(stride), dtype.dtype)


def _rebuild_parameter(data, requires_grad, hooks, state=None):
    return data


_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "UntypedStorage"): _DType(np.dtype("u1")),
    ("torch", "UntypedStorage"): _DType(np.dtype("u1")),
    **{("torch", name): _DType(_DTYPES[dtype]) for name, dtype in _STORAGES.items()},
    **{("torch", name): _DType(dtype) for name, dtype in _DTYPES.items()},
}


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict into `_Tensor` references; refuses every other global."""

    def find_class(self, module: str, name: str):
        try:
            return _GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name}: only state dicts of tensors are read"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, kind, key, _location, _numel = pid
        if not isinstance(kind, _DType):
            raise pickle.UnpicklingError(f"unexpected storage type {kind!r}")
        return _Storage(str(key), kind.dtype)


def needs_torch(path: str | Path) -> bool:
    """Whether reading `path` needs torch: a legacy (pre-zip) torch file. Zip-format files (all
    that torch >= 1.6 writes) are read without it."""
    return not zipfile.is_zipfile(path)


def _import_torch(path: Path):
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path} is not a zip-format torch file (what torch.save writes since torch 1.6): "
            "reading this legacy format needs torch (pip install 'fpsa-jax[convert]'), or "
            "re-save it with a recent torch or as .safetensors"
        ) from None
    return torch


def _unwrap(state, path: Path) -> dict:
    for key in _WRAPPER_KEYS:
        if isinstance(state, dict) and len(state) == 1 and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(state)})")
    return state


def _tensors(state: dict, kind: type) -> dict:
    return {k: v for k, v in state.items() if isinstance(v, kind)}


class TorchReader:
    """Tensors of a torch-saved state dict as read-only NumPy views of the memory-mapped file."""

    def __init__(self, path: Path):
        self._path = Path(path)
        self._mmap = None
        self._torch = None  # the torch module, for a legacy file only
        if needs_torch(self._path):
            self._torch = _import_torch(self._path)
            try:
                state = self._torch.load(self._path, map_location="cpu", weights_only=True)
            except Exception as e:  # torch raises many types for a file that is not a checkpoint
                raise CheckpointError(f"{path} could not be read by torch.load: {e}") from e
            self._tensors = _tensors(_unwrap(state, path), self._torch.Tensor)
            return
        try:
            state = self._open_zip()
            self._tensors = _tensors(_unwrap(state, path), _Tensor)
        except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, KeyError) as e:
            self.close()
            raise CheckpointError(f"{path} is not a readable torch checkpoint: {e}") from None
        except CheckpointError:
            self.close()
            raise

    def _open_zip(self):
        with zipfile.ZipFile(self._path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise ValueError("no ARCHIVE/data.pkl in the zip (not written by torch.save)")
            prefix = pickles[0][: -len("data.pkl")]
            order = prefix + "byteorder"
            if order in archive.namelist() and archive.read(order).strip() != b"little":
                raise ValueError("big-endian torch files are not supported")
            state = _StateDictUnpickler(archive.open(pickles[0])).load()
            self._members = {
                info.filename[len(prefix) + len("data/") :]: info
                for info in archive.infolist()
                if info.filename.startswith(prefix + "data/")
            }
        with self._path.open("rb") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return state

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def read(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        if self._torch is not None:  # legacy file, read by torch
            t = t.detach()
            if t.dtype == self._torch.bfloat16:
                # numpy has no bfloat16: reinterpret the bits as ml_dtypes' bfloat16.
                return t.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
            return t.numpy()
        return self._view(name, t)

    def _view(self, name: str, t: _Tensor) -> np.ndarray:
        info = self._members.get(t.storage.key)
        if info is None:
            raise CheckpointError(f"{self._path}: storage of {name!r} is missing from the archive")
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{self._path}: storage of {name!r} is compressed")
        header = _ZIP_LOCAL_HEADER.unpack_from(self._mmap, info.header_offset)
        if header[0] != b"PK\x03\x04":
            raise CheckpointError(f"{self._path}: the zip entry of {name!r} is corrupt")
        start = info.header_offset + _ZIP_LOCAL_HEADER.size + header[-2] + header[-1]
        raw = np.frombuffer(self._mmap, np.uint8, count=info.file_size, offset=start)
        extent = t.offset + sum((n - 1) * s for n, s in zip(t.shape, t.stride, strict=True)) + 1
        if math.prod(t.shape) and extent * t.dtype.itemsize > info.file_size:
            raise CheckpointError(
                f"{self._path}: {name!r} {t.shape} runs past the end of its storage "
                f"({info.file_size} bytes): the file is truncated or corrupt"
            )
        items = raw[: info.file_size - info.file_size % t.dtype.itemsize].view(t.dtype)
        strides = tuple(s * t.dtype.itemsize for s in t.stride)
        return np.lib.stride_tricks.as_strided(items[t.offset :], t.shape, strides, writeable=False)

    def close(self) -> None:
        self._tensors = {}
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # views handed out still hold it; it closes when they go
                pass
            self._mmap = None

    def __enter__(self) -> TorchReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
