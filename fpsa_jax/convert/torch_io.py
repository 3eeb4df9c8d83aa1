"""Reading `.pth` / `.pt` state dicts; the only place torch is imported, and only when called."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from fpsa_jax.convert.errors import CheckpointError

# Trainers often wrap the state dict one level deep under one of these names.
_WRAPPER_KEYS = ("state_dict", "model", "module")


class TorchReader:
    """Tensors of a torch-saved state dict, memory-mapped (`torch.load(mmap=True)`)."""

    def __init__(self, path: Path):
        try:
            import torch
        except ImportError as e:
            raise CheckpointError(
                f"reading {path} needs torch; install it with `pip install fpsa-jax[convert]` "
                "or convert the checkpoint to .safetensors"
            ) from e
        self._torch = torch
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises many types for a file that is not a checkpoint
            raise CheckpointError(f"{path} could not be read by torch.load: {e}") from e
        for key in _WRAPPER_KEYS:
            if isinstance(state, dict) and len(state) == 1 and isinstance(state.get(key), dict):
                state = state[key]
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} does not hold a state dict (found {type(state)})")
        self._tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def read(self, name: str) -> np.ndarray:
        t = self._tensors[name].detach()
        if t.dtype == self._torch.bfloat16:
            # numpy has no bfloat16: reinterpret the bits as ml_dtypes' bfloat16.
            return t.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    def close(self) -> None:
        self._tensors = {}

    def __enter__(self) -> TorchReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
