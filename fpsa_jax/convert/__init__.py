"""PyTorch / safetensors Wan2.1 DiT checkpoints -> Flax params, and the orbax export.

CLI: `python -m fpsa_jax.convert --src PATH --dst DIR`.
"""

from fpsa_jax.convert.checkpoint import load_wan_checkpoint
from fpsa_jax.convert.errors import CheckpointError
from fpsa_jax.convert.export import load_converted, save_converted

__all__ = ["CheckpointError", "load_converted", "load_wan_checkpoint", "save_converted"]
