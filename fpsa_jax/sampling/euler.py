"""Flow-matching Euler: x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v_i.

The same step as diffusers' `FlowMatchEulerDiscreteScheduler` on the same sigmas. Wan2.1 ships
no Euler sampler; this one uses Wan's schedule (`flow_schedule`) so the two solvers differ only in
the update rule. Its state is empty; the host table holds the step sizes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

# Columns of an `euler_tables` row.
DSIGMA = 0
NUM_COLUMNS = 1


class EulerState(NamedTuple):
    """Euler keeps no memory between steps."""


def euler_init(x: jax.Array) -> EulerState:
    del x
    return EulerState()


def euler_tables(sigmas: np.ndarray) -> np.ndarray:
    """float64 [N, 1]: column DSIGMA = sigma_{i+1} - sigma_i (< 0), from sigmas [N + 1]."""
    sig = np.asarray(sigmas, np.float64)
    if sig.ndim != 1 or sig.shape[0] < 2 or not np.all(np.diff(sig) < 0):
        raise ValueError("sigmas must be [N + 1] (N >= 1) and strictly decreasing")
    return np.diff(sig)[:, None]


def euler_step(
    row: jax.Array, state: EulerState, x: jax.Array, v: jax.Array
) -> tuple[jax.Array, EulerState]:
    """One Euler step: x [B, F, H, W, C], v its velocity, row [1] of step i."""
    return x + row[DSIGMA].astype(x.dtype) * v.astype(x.dtype), state
