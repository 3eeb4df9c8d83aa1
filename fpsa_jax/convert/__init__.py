"""PyTorch / safetensors Wan2.1 checkpoints -> Flax params (the DiT, and a whole text-to-video
model directory), and the orbax export.

CLI: `python -m fpsa_jax.convert --src PATH --dst DIR`.
"""

from fpsa_jax.convert.checkpoint import load_wan_checkpoint
from fpsa_jax.convert.errors import CheckpointError
from fpsa_jax.convert.export import load_converted, save_converted
from fpsa_jax.convert.t2v import (
    ModelFiles,
    T2VWeights,
    check_t2v_directory,
    find_model_files,
    load_t2v_weights,
    with_fp8_linears,
)

__all__ = [
    "CheckpointError",
    "ModelFiles",
    "T2VWeights",
    "check_t2v_directory",
    "find_model_files",
    "load_converted",
    "load_t2v_weights",
    "load_wan_checkpoint",
    "save_converted",
    "with_fp8_linears",
]
