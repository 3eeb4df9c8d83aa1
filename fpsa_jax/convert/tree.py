"""Small helpers every converter shares: target dtypes, nested-dict paths, stacked layer leaves."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fpsa_jax.convert.errors import CheckpointError, format_keys

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


def require_shapes(shapes: dict, needed: dict[str, int], naming: str) -> None:
    """CheckpointError unless every key of `needed` is in `shapes` with that many dimensions;
    `naming` says which key names the message lists (e.g. "original names")."""
    missing = [k for k in needed if k not in shapes]
    if missing:
        raise CheckpointError(
            f"cannot infer the model config: missing keys ({naming}) {format_keys(missing)}"
        )
    for key, ndim in needed.items():
        if len(shapes[key]) != ndim:
            raise CheckpointError(
                f"key {key!r}: expected a {ndim}-d tensor, found shape {shapes[key]}"
            )


def set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """tree[path[0]][path[1]]... = value, creating the intermediate dicts."""
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def stack_layers(read_layer: Callable[[int], np.ndarray], num_layers: int, dtype) -> jax.Array:
    """[num_layers, ...] in `dtype` on the default device, from `read_layer(i)` one at a time.

    Each layer is cast (rounding to nearest even, as torch's .to()) and copied to the device as
    soon as it is read, and the stack is built there: host memory holds a few layers, never a
    whole stacked leaf, let alone the checkpoint. (Stacking on the host would not bound it by one
    leaf: `device_put` hands its host array back to Python only some time after the copy, so
    finished leaves pile up behind the next.) The device holds the leaf twice, briefly.
    """
    return jnp.stack(
        [jax.device_put(np.asarray(read_layer(i)).astype(dtype)) for i in range(num_layers)]
    )
