"""Sharded records of precomputed latents and text embeddings.

A dataset is a directory:

    index.json          format, version, num_examples, latent_shape [f, h, w, C], latent_dtype,
                        text_dim, text_dtype, max_text_length, shards [{file, count}], metadata
    shard-00000.rec     many examples each
    ...

An example is (latent [f, h, w, C], text [Lt, E] cut to its true length, caption). All examples
share one latent shape. A shard file is

    8 bytes   magic b"FPSAREC1"
    8 bytes   uint64 little-endian offset of the JSON header
    8 bytes   uint64 little-endian length of the JSON header
    ...       raw C-order arrays, each at a 64-byte aligned offset
    ...       JSON header: {"count", "captions", "arrays": {name: {"dtype", "shape", "offset"}}}

with arrays latents [n, f, h, w, C], text [sum Lt, E] (all captions' rows one after another) and
text_offsets int64 [n + 1]. Arrays are read through np.memmap, so random access is cheap.
Shards and the index are written aside and renamed into place: a failure never leaves a partial
file under its final name, and a dataset without index.json is incomplete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

FORMAT = "fpsa_jax.records"
VERSION = 1
INDEX = "index.json"
MAGIC = b"FPSAREC1"
_PREAMBLE = struct.Struct("<8sQQ")
_ALIGN = 64
_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def _dtype(name: str) -> np.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unsupported record dtype {name!r}; valid: {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclasses.dataclass(frozen=True)
class Example:
    """latent [f, h, w, C]; text [Lt, E] (its true length); caption."""

    latent: np.ndarray
    text: np.ndarray
    caption: str


def _write_arrays(f, arrays: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Writes each array at an aligned offset of the open file; returns their descriptions."""
    described = {}
    for name, array in arrays.items():
        pad = -f.tell() % _ALIGN
        f.write(b"\0" * pad)
        described[name] = {
            "dtype": array.dtype.name,
            "shape": list(array.shape),
            "offset": f.tell(),
        }
        f.write(np.ascontiguousarray(array).tobytes())
    return described


def _atomic_write(path: Path, write) -> None:
    """Calls write(file) on a hidden temporary beside `path`, then renames it to `path`; removes
    the temporary on any failure."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it owner-only
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_shard(path: Path, examples: list[Example], latent_dtype: str, text_dtype: str) -> None:
    """Writes one shard file atomically."""
    if not examples:
        raise ValueError("a shard needs at least one example")
    lengths = [e.text.shape[0] for e in examples]
    arrays = {
        "latents": np.stack([e.latent for e in examples]).astype(_dtype(latent_dtype)),
        "text": np.concatenate([e.text for e in examples]).astype(_dtype(text_dtype)),
        "text_offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
    }

    def write(f):
        f.write(_PREAMBLE.pack(MAGIC, 0, 0))
        header = {
            "count": len(examples),
            "captions": [e.caption for e in examples],
            "arrays": _write_arrays(f, arrays),
        }
        blob = json.dumps(header).encode("utf-8")
        offset = f.tell()
        f.write(blob)
        f.seek(0)
        f.write(_PREAMBLE.pack(MAGIC, offset, len(blob)))

    _atomic_write(path, write)


class RecordWriter:
    """Writes examples into `out_dir` in shards of `shard_size`; `close()` (or leaving the `with`
    block without an error) writes the last shard and index.json.

    All latents must share one shape [f, h, w, C] and all texts one width E. An existing dataset
    in `out_dir` is refused unless `overwrite`, which deletes its index and shards first.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        shard_size: int,
        latent_dtype: str = "bfloat16",
        text_dtype: str = "bfloat16",
        metadata: dict[str, Any] | None = None,
        overwrite: bool = False,
    ):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        _dtype(latent_dtype), _dtype(text_dtype)
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        index = self.out_dir / INDEX
        if index.exists():
            if not overwrite:
                raise FileExistsError(
                    f"{index} exists; RecordWriter(..., overwrite=True) replaces the dataset"
                )
            for shard in json.loads(index.read_text()).get("shards", []):
                (self.out_dir / shard["file"]).unlink(missing_ok=True)
            index.unlink()
        self.shard_size, self.metadata = shard_size, dict(metadata or {})
        self.latent_dtype, self.text_dtype = latent_dtype, text_dtype
        self._pending: list[Example] = []
        self._shards: list[dict[str, Any]] = []
        self._latent_shape: tuple[int, ...] | None = None
        self._text_dim: int | None = None
        self._max_text_length = 0
        self._closed = False

    @property
    def num_examples(self) -> int:
        return sum(s["count"] for s in self._shards) + len(self._pending)

    @property
    def num_shards(self) -> int:
        """Shards written so far."""
        return len(self._shards)

    @property
    def latent_shape(self) -> tuple[int, ...] | None:
        """[f, h, w, C] of the examples (None before the first)."""
        return self._latent_shape

    @property
    def text_dim(self) -> int | None:
        return self._text_dim

    def add(self, latent: np.ndarray, text: np.ndarray, caption: str) -> None:
        """Adds one example: latent [f, h, w, C], text [Lt, E] with Lt >= 1, caption."""
        if self._closed:
            raise ValueError("RecordWriter is closed")
        latent, text = np.asarray(latent), np.asarray(text)
        if latent.ndim != 4:
            raise ValueError(f"latent must be [f, h, w, C], got shape {latent.shape}")
        if text.ndim != 2 or text.shape[0] < 1:
            raise ValueError(f"text must be [Lt, E] with Lt >= 1, got shape {text.shape}")
        if self._latent_shape is None:
            self._latent_shape, self._text_dim = latent.shape, text.shape[1]
        if latent.shape != self._latent_shape:
            raise ValueError(
                f"every latent must have shape {self._latent_shape}, got {latent.shape} "
                f"(example {self.num_examples}, {caption!r})"
            )
        if text.shape[1] != self._text_dim:
            raise ValueError(f"every text must be [Lt, {self._text_dim}], got {text.shape}")
        self._max_text_length = max(self._max_text_length, text.shape[0])
        self._pending.append(Example(latent, text, str(caption)))
        if len(self._pending) >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        name = f"shard-{len(self._shards):05d}.rec"
        write_shard(self.out_dir / name, self._pending, self.latent_dtype, self.text_dtype)
        self._shards.append({"file": name, "count": len(self._pending)})
        self._pending = []

    def close(self) -> Path:
        """Writes the pending shard and index.json; returns the index path."""
        if self._closed:
            return self.out_dir / INDEX
        if self._latent_shape is None:
            raise ValueError("no examples were added; nothing to write")
        self._flush()
        index = {
            "format": FORMAT,
            "version": VERSION,
            "num_examples": self.num_examples,
            "latent_shape": list(self._latent_shape),
            "latent_dtype": self.latent_dtype,
            "text_dim": self._text_dim,
            "text_dtype": self.text_dtype,
            "max_text_length": self._max_text_length,
            "shards": self._shards,
            "metadata": self.metadata,
        }
        blob = json.dumps(index, indent=2).encode("utf-8")
        _atomic_write(self.out_dir / INDEX, lambda f: f.write(blob))
        self._closed = True
        return self.out_dir / INDEX

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # keep finished shards, but write no index: the dataset stays incomplete
            self._closed = True


class Records:
    """Random access to a dataset written by `RecordWriter`: `len`, `records[i]` -> Example."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index_path = self.path / INDEX
        if not index_path.is_file():
            raise FileNotFoundError(
                f"no {INDEX} in {self.path}: not a records directory, or its writing did not "
                f"finish (python -m train.prepare writes one)"
            )
        self.index = json.loads(index_path.read_text())
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise ValueError(
                f"{index_path} is not {FORMAT} version {VERSION}: format "
                f"{self.index.get('format')!r}, version {self.index.get('version')!r}"
            )
        self.latent_shape = tuple(self.index["latent_shape"])
        self.text_dim = int(self.index["text_dim"])
        self.latent_dtype = _dtype(self.index["latent_dtype"])
        self.text_dtype = _dtype(self.index["text_dtype"])
        counts = [int(s["count"]) for s in self.index["shards"]]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if self._starts[-1] != self.index["num_examples"]:
            raise ValueError(f"{index_path}: shard counts do not add up to num_examples")
        self._shards: dict[int, tuple[dict[str, np.ndarray], list[str]]] = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _shard(self, k: int) -> tuple[dict[str, np.ndarray], list[str]]:
        if k not in self._shards:
            self._shards[k] = read_shard(self.path / self.index["shards"][k]["file"])
        return self._shards[k]

    def __getitem__(self, i: int) -> Example:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"example {i} out of range for {n} examples")
        i %= n
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        arrays, captions = self._shard(k)
        j = i - int(self._starts[k])
        lo, hi = arrays["text_offsets"][j], arrays["text_offsets"][j + 1]
        return Example(
            np.asarray(arrays["latents"][j]), np.asarray(arrays["text"][lo:hi]), captions[j]
        )

    def __iter__(self) -> Iterator[Example]:
        for i in range(len(self)):
            yield self[i]


def read_shard(path: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """Memory-maps a shard file: ({name: read-only array}, captions)."""
    with open(path, "rb") as f:
        preamble = f.read(_PREAMBLE.size)
        if len(preamble) < _PREAMBLE.size or preamble[:8] != MAGIC:
            raise ValueError(f"{path} is not a records shard (bad magic)")
        _, offset, length = _PREAMBLE.unpack(preamble)
        f.seek(offset)
        header = json.loads(f.read(length).decode("utf-8"))
    arrays = {}
    for name, d in header["arrays"].items():
        dtype = np.dtype(np.int64) if d["dtype"] == "int64" else _dtype(d["dtype"])
        shape, offset = tuple(d["shape"]), d["offset"]
        arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    return arrays, header["captions"]
