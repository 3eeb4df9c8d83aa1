"""Turning the `path` a user gives into a tensor reader plus the `config.json` found beside it."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fpsa_jax.convert.errors import CheckpointError, CheckpointNotFoundError
from fpsa_jax.convert.safetensors_io import SafetensorsReader
from fpsa_jax.convert.torch_io import TorchReader

# The DiT weights in both the Wan2.1 repos and diffusers' `transformer/` folders.
_WEIGHTS_STEM = "diffusion_pytorch_model"


class TensorReader(Protocol):
    """Name -> tensor access shared by the safetensors and torch readers."""

    def __iter__(self) -> Iterator[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def read(self, name: str) -> np.ndarray: ...
    def close(self) -> None: ...


@dataclasses.dataclass
class Source:
    """An opened checkpoint: its tensors, the parsed config.json (or None) and what was read."""

    reader: TensorReader
    config_json: dict[str, Any] | None
    description: str


def open_source(path: str | Path) -> Source:
    """Opens a `.safetensors` file, a `*.safetensors.index.json`, a `.pth`/`.pt` file, or a
    model directory (Wan2.1 repo, diffusers repo root, or its `transformer/` folder).

    `config.json` is read from the directory that holds the weights, when there is one.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint path does not exist: {path}")
    if path.is_dir():
        path = _weights_in_directory(path)
    name = path.name
    if path.is_dir():  # several shards without an index
        files = _safetensors_files(path)
        reader = SafetensorsReader.from_files(files)
        what = f"{len(files)} safetensors files in {path}"
    elif name.endswith(".safetensors.index.json"):
        reader, what = SafetensorsReader.from_index(path), f"sharded safetensors index {path}"
    elif name.endswith(".safetensors"):
        reader, what = SafetensorsReader.from_files([path]), f"safetensors file {path}"
    elif name.endswith((".pth", ".pt")):
        reader, what = TorchReader(path), f"torch file {path}"
    else:
        raise CheckpointError(
            f"{path}: expected a .safetensors, .safetensors.index.json, .pth "
            "or .pt file, or a model directory"
        )
    folder = path if path.is_dir() else path.parent
    return Source(reader, read_config_json(folder / "config.json"), what)


def _weights_in_directory(folder: Path) -> Path:
    """The index or single file to read in `folder`; `folder` itself for unindexed shards."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    preferred = [p for p in indexes if p.name.startswith(_WEIGHTS_STEM)]
    if len(preferred) == 1 or len(indexes) == 1:
        return (preferred or indexes)[0]
    if len(indexes) > 1:
        raise CheckpointError(
            f"{folder} holds several safetensors indexes "
            f"({[p.name for p in indexes]}); pass the one to convert"
        )
    files = _safetensors_files(folder)
    if len(files) == 1:
        return files[0]
    if files:
        return folder
    if (folder / "transformer").is_dir():  # diffusers pipeline root
        return _weights_in_directory(folder / "transformer")
    raise CheckpointError(
        f"no .safetensors weights found in {folder} (expected "
        f"{_WEIGHTS_STEM}*.safetensors, an index, or a transformer/ folder)"
    )


def _safetensors_files(folder: Path) -> list[Path]:
    """The `*.safetensors` in `folder`, only the DiT's own when its usual name is among them."""
    files = sorted(folder.glob("*.safetensors"))
    preferred = [p for p in files if p.name.startswith(_WEIGHTS_STEM)]
    return preferred or files


def read_config_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return config
