"""Converted checkpoints on disk: an orbax checkpoint of the params plus the WanConfig as JSON.

Layout of a converted directory DST:
  DST/config.json   WanConfig.to_json()
  DST/params/       orbax StandardCheckpointer checkpoint of the parameter tree; with the config's
                    linear_quant "fp8" its block linears are FP8 kernels + float32 kernel_scale
                    (`fpsa_jax.model.fp8_linear.quantize_linear_weights`), half the bytes of bf16
Writes go to a hidden sibling temp directory that is renamed into place at the end, so DST is
either absent, the old directory, or complete; never half-written. What may be written and
replaced, and the cleanup after killed conversions: `fpsa_jax.convert.destination`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from fpsa_jax.config import WanConfig
from fpsa_jax.convert import keys as K
from fpsa_jax.convert.destination import (
    CONFIG_FILE,
    PARAMS_DIR,
    check_destination,
    clean_destination,
)
from fpsa_jax.convert.errors import CheckpointError, CheckpointNotFoundError
from fpsa_jax.model.fp8_linear import BLOCK_LINEARS, FP8, is_quantized
from fpsa_jax.outputs import sibling_temp


def save_converted(
    dst: str | Path, config: WanConfig, params: dict[str, Any], *, overwrite: bool = False
) -> Path:
    """Writes `params` (tree of `param_shapes(config)`) and `config` to directory `dst`.

    Atomic: everything is written to a temp directory next to `dst`, then renamed to `dst`; on
    failure the temp directory is removed and `dst` is untouched. Temp directories of killed
    earlier saves of `dst` are removed first; `overwrite` replaces only a converted checkpoint.
    """
    clean_destination(dst)
    dst = check_destination(dst, overwrite)
    _check_tree(config, params)
    tmp = sibling_temp(dst, is_dir=True)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp / PARAMS_DIR, params)
            checkpointer.wait_until_finished()
        (tmp / CONFIG_FILE).write_text(config.to_json() + "\n")
        _move_into_place(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def load_converted(dst: str | Path) -> tuple[WanConfig, dict[str, Any]]:
    """Reads a directory written by `save_converted`: (WanConfig, params as jax arrays on the
    default device, with the dtypes they were saved in)."""
    dst = Path(dst).expanduser().absolute()
    if not (dst / CONFIG_FILE).is_file() or not (dst / PARAMS_DIR).is_dir():
        raise CheckpointNotFoundError(
            f"{dst} is not a converted checkpoint (needs {CONFIG_FILE} and {PARAMS_DIR}/)"
        )
    config = WanConfig.load(dst / CONFIG_FILE)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(dst / PARAMS_DIR).item_metadata.tree
        # An explicit target: restore onto this host's device whatever device saved it.
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata
        )
        params = checkpointer.restore(dst / PARAMS_DIR, target)
    _check_tree(config, params)
    return config, params


def _move_into_place(tmp: Path, dst: Path) -> None:
    if not dst.exists():
        os.replace(tmp, dst)
        return
    # rename() cannot replace a non-empty directory: move the old one aside first.
    old = sibling_temp(dst, is_dir=True, tag="old")
    os.replace(dst, old / dst.name)
    try:
        os.replace(tmp, dst)
    except BaseException:
        os.replace(old / dst.name, dst)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _check_tree(config: WanConfig, params: dict[str, Any]) -> None:
    expected = {path: shape for path, shape in K.param_shapes(config).items()}
    found = {
        tuple(k.key for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }
    quantized = is_quantized(params)
    if quantized != (config.linear_quant == "fp8"):
        held = "FP8 block linears (kernel_scale leaves)" if quantized else "float block linears"
        raise CheckpointError(
            f"params hold {held} but the config has linear_quant={config.linear_quant!r}; a "
            "converted checkpoint with FP8 linears is written by `python -m fpsa_jax.convert "
            "--linear_quant fp8` and read with its own config.json"
        )
    fp8_leaves = {
        tuple(k.key for k in path)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if leaf.dtype == FP8
    }
    fp8_expected = (
        {("blocks", *linear, "kernel") for linear in BLOCK_LINEARS} if quantized else set()
    )
    if fp8_leaves != fp8_expected:
        wrong = sorted(".".join(p) for p in fp8_leaves ^ fp8_expected)
        raise CheckpointError(
            f"FP8 (float8_e4m3fn) leaves must be exactly the block linears' kernels of a "
            f"linear_quant='fp8' tree; these are not: {wrong[:10]}"
        )
    if found != expected:
        diff = sorted(".".join(p) for p in expected.keys() ^ found.keys())
        wrong = sorted(
            ".".join(p) for p in expected.keys() & found.keys() if expected[p] != found[p]
        )
        raise CheckpointError(
            f"params do not match the config: keys only on one side {diff[:10]}"
            f", wrong shapes {wrong[:10]}"
        )
