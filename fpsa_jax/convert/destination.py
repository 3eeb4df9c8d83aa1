"""The destination of a conversion: what may be written and replaced there, checked before the
long read, and what killed earlier conversions of it left behind.

A conversion writes DST/config.json and DST/params/ into a hidden sibling of DST and renames it
into place (`fpsa_jax.outputs.sibling_temp`); replacing an existing DST moves it aside into a
second sibling first. The rules:
- DST never equals, contains or lies inside the source (symlinks resolved): replacing it would
  delete the weights being read.
- `overwrite` replaces only a converted checkpoint (nothing in DST but config.json and
  params/) or an empty directory: never files this code did not write.
- Siblings of killed conversions of DST are removed at the next one; a replace killed between
  its two renames is finished backwards (the old DST is put back).
"""

from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path

import jax.numpy as jnp

from fpsa_jax.outputs import Output, OutputError, check_outputs, remove_stale_temps, stale_temps

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
WRITTEN = frozenset({CONFIG_FILE, PARAMS_DIR})  # everything a conversion puts in DST


def check_destination(dst: str | Path, overwrite: bool = False, *, src=None) -> Path:
    """The absolute `dst` when a conversion may write it, else FileExistsError (OutputError when
    it overlaps `src`) naming the reason: `dst` is a file, a non-empty directory without
    `overwrite`, holds what a conversion does not write, or overlaps `src`."""
    dst = Path(dst).expanduser().absolute()
    if src is not None:
        check_apart(src, dst)
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"destination {dst} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"destination {dst} exists and is not empty; pass --overwrite "
                "(overwrite=True) to replace it"
            )
        foreign = sorted(p.name for p in dst.iterdir() if p.name not in WRITTEN)
        if foreign:
            shown = ", ".join(foreign[:5]) + (
                f" and {len(foreign) - 5} more" if foreign[5:] else ""
            )
            raise FileExistsError(
                f"destination {dst} is not a converted checkpoint (it also holds {shown}); "
                "overwrite replaces only what a conversion wrote: remove it yourself or pick "
                "another destination"
            )
    return dst


def check_apart(src: str | Path, dst: str | Path) -> None:
    """OutputError when `dst` equals, contains or lies inside `src`, symlinks resolved."""
    s, d = Path(src).expanduser().resolve(), Path(dst).expanduser().resolve()
    if d == s:
        how = "is"
    elif d in s.parents:
        how = "contains"
    elif s in d.parents:
        how = "lies inside"
    else:
        return
    raise OutputError(
        f"--dst {dst} {how} the source {src}; writing it would delete the source: pick "
        "a destination outside it"
    )


def clean_destination(dst: str | Path) -> list[Path]:
    """Removes what killed conversions of `dst` left beside it; returns what it removed. A
    replace killed after moving the old `dst` aside gets the old one back first."""
    dst = Path(dst).expanduser().absolute()
    removed = remove_stale_temps(dst)
    for old in stale_temps(dst, tag="old"):
        if not dst.exists() and (old / dst.name).is_dir():
            os.replace(old / dst.name, dst)
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old)
    return removed


def prepare_destination(
    dst: str | Path, overwrite: bool, *, src: str | Path, size: int | None = None
) -> tuple[Path, list[Path]]:
    """Everything about `dst` before a conversion reads `src`: stale siblings removed (they may
    hold the space needed), `check_destination`, and the parent writable with `size` bytes
    free. Returns (absolute dst, the stale siblings removed)."""
    check_apart(src, dst)
    removed = clean_destination(dst)
    dst = check_destination(dst, overwrite)
    check_outputs([Output("--dst", dst, is_dir=True, aside=True, size=size)])
    return dst, removed


# The torch names of the block linears' weights (`fp8_linear.BLOCK_LINEARS`) in both layouts.
_BLOCK_LINEAR_WEIGHT = re.compile(
    r"blocks\.\d+\.((self_attn|cross_attn)\.[qkvo]|ffn\.[02]"
    r"|attn[12]\.to_(q|k|v|out\.0)|ffn\.net\.(0\.proj|2))\.weight"
)


def converted_size(reader, dtype, linear_quant: str = "none") -> int:
    """Bytes the tensors of `reader` (a `sources.TensorReader`) take in `dtype`; with
    `linear_quant` "fp8" the block linears' weights take one byte per value plus a float32
    scale per output channel."""
    itemsize = jnp.dtype(dtype).itemsize
    total = 0
    for name in reader:
        shape = reader.shape(name)
        if linear_quant == "fp8" and _BLOCK_LINEAR_WEIGHT.fullmatch(name):
            total += math.prod(shape) + 4 * shape[0]  # torch weights are [out, in]
        else:
            total += math.prod(shape) * itemsize
    return total
