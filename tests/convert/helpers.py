"""Helpers of the conversion tests: writing checkpoints, comparing trees bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import save_file


def write_safetensors(path: Path, state: dict[str, np.ndarray]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))
    return path


def write_sharded(
    folder: Path,
    state: dict[str, np.ndarray],
    num_shards: int = 3,
    stem: str = "diffusion_pytorch_model",
) -> Path:
    """Shards `state` round-robin and writes `{stem}.safetensors.index.json`; returns the index."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    weight_map = {}
    for s in range(num_shards):
        shard = f"{stem}-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: state[n] for n in names[s::num_shards]}
        write_safetensors(folder / shard, part)
        weight_map.update(dict.fromkeys(part, shard))
    index = folder / f"{stem}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def assert_tree_equal(actual, expected) -> None:
    """Same tree structure and bitwise-equal leaves of the same dtype and shape."""
    a_paths = jax.tree_util.tree_flatten_with_path(actual)[0]
    e_paths = jax.tree_util.tree_flatten_with_path(expected)[0]
    assert [p for p, _ in a_paths] == [p for p, _ in e_paths]
    for (path, a), (_, e) in zip(a_paths, e_paths, strict=True):
        a, e = np.ascontiguousarray(a), np.ascontiguousarray(e)
        assert a.dtype == e.dtype and a.shape == e.shape, (path, a.dtype, e.dtype, a.shape)
        np.testing.assert_array_equal(
            a.reshape(-1).view(np.uint8), e.reshape(-1).view(np.uint8), err_msg=str(path)
        )
