"""Reading safetensors without torch: header parsing, memory-mapped tensors, sharded indexes.

A safetensors file is an 8-byte little-endian header size N, N bytes of JSON mapping each tensor
name to {dtype, shape, data_offsets=[begin, end]} (offsets relative to byte 8 + N), then the raw
little-endian data. We parse the header ourselves and hand out `np.memmap` views, so a tensor is
read from disk only when it is converted and the checkpoint is never held in memory as a whole.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from fpsa_jax.convert.errors import CheckpointError, CheckpointNotFoundError, format_keys

# safetensors dtype codes -> numpy dtypes ("<" because the format is little-endian).
_DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "I16": np.dtype("<i2"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
    "BOOL": np.dtype("?"),
}
# A header larger than this is not a header: the file is something else.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: `file`, absolute byte range [start, end), dtype and shape."""

    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parses the header of one safetensors file into {tensor name: TensorInfo}."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"safetensors file not found: {path}")
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(
                f"{path} is not a safetensors file (header size {header_len} "
                f"does not fit in a file of {size} bytes)"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} is not a safetensors file (bad JSON header: {e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (header is not a JSON object)")
    base = 8 + header_len
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(
                f"{path}: unsupported or malformed header entry for {name!r}: {entry!r} "
                f"(dtypes understood: {sorted(_DTYPES)})"
            ) from e
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0 or begin > end:
            raise CheckpointError(
                f"{path}: tensor {name!r} of shape {shape} {entry['dtype']} "
                f"has a byte range [{begin}, {end}) that does not match"
            )
        if base + end > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name!r} ends at byte {base + end} but the file "
                f"has {size} bytes (an interrupted download or copy?)"
            )
        infos[name] = TensorInfo(path, dtype, shape, base + begin, base + end)
    return infos


class SafetensorsReader:
    """Tensors of one or more safetensors files, read lazily as read-only memmap views.

    Use as a context manager, or call `close()`, to drop the file mappings.
    """

    def __init__(self, infos: dict[str, TensorInfo]):
        self._infos = infos
        self._maps: dict[Path, np.memmap] = {}

    @classmethod
    def from_files(cls, files: Iterable[Path]) -> SafetensorsReader:
        """All tensors of `files`; a name found in two files is an error."""
        infos: dict[str, TensorInfo] = {}
        for file in files:
            header = read_header(file)
            dupes = infos.keys() & header.keys()
            if dupes:
                raise CheckpointError(
                    f"tensors {format_keys(dupes)} appear in more than one file (second: {file})"
                )
            infos.update(header)
        return cls(infos)

    @classmethod
    def from_index(cls, index_path: Path) -> SafetensorsReader:
        """The tensors listed in a `*.safetensors.index.json` ({"weight_map": {name: shard}})."""
        index_path = Path(index_path)
        if not index_path.is_file():
            raise CheckpointNotFoundError(f"safetensors index not found: {index_path}")
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{index_path} is not a safetensors index (needs a JSON "
                f"'weight_map' of tensor name -> shard file): {e}"
            ) from e
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (index_path.parent / s).is_file()]
        if missing:
            raise CheckpointNotFoundError(
                f"{index_path} references {len(missing)} shard file(s) missing from "
                f"{index_path.parent}: {format_keys(missing)}"
            )
        headers = {s: read_header(index_path.parent / s) for s in shards}
        absent = [name for name, s in weight_map.items() if name not in headers[s]]
        if absent:
            raise CheckpointError(
                f"{index_path} maps tensors {format_keys(absent)} to shards "
                "that do not contain them"
            )
        return cls({name: headers[s][name] for name, s in weight_map.items()})

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._infos[name].shape

    def read(self, name: str) -> np.ndarray:
        """A read-only view of tensor `name`; its bytes are paged in from disk when touched."""
        info = self._infos[name]
        if info.file not in self._maps:
            self._maps[info.file] = np.memmap(info.file, dtype=np.uint8, mode="r")
        raw = self._maps[info.file][info.start : info.end]
        return raw.view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        self._maps.clear()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
