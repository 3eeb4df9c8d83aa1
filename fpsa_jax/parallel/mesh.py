"""`make_mesh`: the one device mesh of training and inference, axes ("data", "fsdp", "seq").

- data: pure data parallelism (replicated parameters; in inference the CFG pair and prompts).
- fsdp: data parallelism with parameters sharded over the model dimension ('embed').
- seq: sequence parallelism; self-attention switches to head sharding inside (Ulysses).

The axes are `AxisType.Auto` (JAX 0.11's `jax.make_mesh` defaults to Explicit), so parameters and
activations are placed by `jit` in/out shardings and Flax's logical constraints, and the
partitioner propagates the rest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "seq")


def make_mesh(
    data: int = 1, fsdp: int = 1, seq: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A mesh of shape (data, fsdp, seq) over `devices` (all of `jax.devices()` by default).

    One of the three sizes may be -1, meaning "all the devices the other two leave". The product
    of the sizes must equal the number of devices exactly (a mesh never silently drops devices).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = {"data": data, "fsdp": fsdp, "seq": seq}
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(f"mesh axis {name!r} must be a positive int or -1, got {size!r}")
    rest = [name for name, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise ValueError(f"only one mesh axis may be -1 (the rest), got -1 for {rest}")
    if rest:
        known = math.prod(size for size in sizes.values() if size != -1)
        if n % known:
            raise ValueError(
                f"{n} devices are not divisible by the fixed mesh axes "
                f"{ {k: v for k, v in sizes.items() if v != -1} } (product {known}), so "
                f"{rest[0]!r}=-1 has no integer size"
            )
        sizes[rest[0]] = n // known
    shape = tuple(sizes[name] for name in MESH_AXES)
    if math.prod(shape) != n:
        raise ValueError(
            f"mesh data={shape[0]} x fsdp={shape[1]} x seq={shape[2]} = {math.prod(shape)} "
            f"devices, but {n} devices are available; the product must match (use -1 for one "
            f"axis to take the rest)"
        )
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def check_mesh_shape(
    shape: Sequence[int],
    *,
    devices: int,
    batch: int | None = None,
    heads: int | None = None,
    tokens: int | None = None,
) -> None:
    """Raises ValueError naming the first thing a (data, fsdp, seq) mesh of `shape` cannot run
    before any mesh is made: more devices than `devices`; a `batch` not divisible by
    data x fsdp (each device takes whole samples); `heads` or `tokens` (per sample) not
    divisible by seq (Ulysses splits the tokens, then the heads, over it). None skips a check."""
    data, fsdp, seq = shape
    if data * fsdp * seq > devices:
        raise ValueError(
            f"data={data} x fsdp={fsdp} x seq={seq} needs {data * fsdp * seq} devices, "
            f"{devices} available"
        )
    if batch is not None and batch % (data * fsdp):
        raise ValueError(
            f"the batch of {batch} is not divisible by data x fsdp = {data * fsdp} (each device "
            "takes whole samples)"
        )
    if heads is not None and heads % seq:
        raise ValueError(f"seq={seq} does not divide the model's {heads} attention heads")
    if tokens is not None and tokens % seq:
        raise ValueError(f"seq={seq} does not divide the {tokens} tokens of a video")
