"""What the Hopper kernels need from the process: an NVIDIA GPU of compute capability >= 9.0."""

from __future__ import annotations

import jax


def require_hopper(impl: str) -> None:
    """Raises ValueError naming `impl` unless JAX's default device is a Hopper-class GPU."""
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    if jax.default_backend() != "gpu" or capability is None or float(capability) < 9.0:
        raise ValueError(
            f"impl={impl!r} needs an NVIDIA Hopper GPU (compute capability >= 9.0 for FP8 "
            f"wgmma); this process runs on {device.device_kind} ({jax.default_backend()}). Use "
            f"impl='xla' (any backend) or impl='pallas' (runs interpreted on CPU)."
        )
