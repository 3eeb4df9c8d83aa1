"""Small helpers every converter shares: target dtypes, nested-dict paths, stacked layer leaves."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from fpsa_jax.convert.errors import CheckpointError

DTYPE_NAMES = ("bfloat16", "float32", "float16")


def dtype_name(dtype: Any) -> str:
    """The name of a supported parameter dtype; CheckpointError for anything else."""
    try:
        name = np.dtype(dtype).name
    except TypeError as e:
        raise CheckpointError(f"unknown dtype {dtype!r}; valid: {DTYPE_NAMES}") from e
    if name not in DTYPE_NAMES:
        raise CheckpointError(f"dtype must be one of {DTYPE_NAMES}, got {name!r}")
    return name


def set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """tree[path[0]][path[1]]... = value, creating the intermediate dicts."""
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def stack_layers(read_layer: Callable[[int], np.ndarray], num_layers: int, dtype) -> jax.Array:
    """[num_layers, ...] in `dtype` on the default device, from `read_layer(i)` one at a time.

    The stacked leaf is allocated once and filled layer by layer (the cast rounds to nearest even,
    as torch's .to()), so memory holds one leaf beyond the result, never the whole checkpoint.
    """
    stacked = None
    for i in range(num_layers):
        layer = read_layer(i)
        if stacked is None:
            stacked = np.empty((num_layers, *layer.shape), dtype)
        stacked[i] = layer
    return jax.device_put(stacked)
