"""Wan2.1's flow UniPC sampler: order 2, predict_x0, B(h) = expm1(-h) ('bh2'), UniC corrector.

This is the solver of Wan's `FlowUniPCMultistepScheduler` with the settings `text2video.py` uses
(solver_order=2, predict_x0=True, solver_type="bh2", lower_order_final=True, no disabled
corrector steps, final sigma 0). With alpha = 1 - sigma, lambda = log(alpha / sigma), and the
data prediction m_i = x_i - sigma_i v_i of step i, one call of Wan's `step` at step i does:

  1. corrector (UniC, skipped at step 0), of the order q the predictor used at step i - 1:
     x_c = UniC(x_c of step i-1, m_{i-2}, m_{i-1}, m_i)  -- moves the last corrected sample
     from sigma_{i-1} to sigma_i again, now using this step's m_i;
  2. predictor (UniP), of order p_i = min(2, i + 1, N - i) (warm-up, then lower order at the
     final step): x_{i+1} = UniP(x_c, m_{i-1}, m_i), from sigma_i to sigma_{i+1}.
The model is evaluated at the predictor's output; the final output is the last predictor's.

Every coefficient depends only on the sigmas, never on the data: `unipc_tables` computes them on
the host in float64 (one row per step), and `unipc_step` is a linear combination that reads row i,
so the loop runs under `jax.lax.fori_loop` with a small state pytree.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SOLVER_ORDER = 2

# Columns of a `unipc_tables` row.
SIGMA, KX, KLAST, KM1, KM2, KMI, PA, PMI, PM1 = range(9)
NUM_COLUMNS = 9


class UniPCState(NamedTuple):
    """The solver's memory between steps; every field has the latent's shape [B, F, H, W, C].

    x_last: the corrected sample of the previous step (x_c of step i - 1).
    m1: the data prediction of the previous step, m_{i-1}.
    m2: the one before, m_{i-2}.
    """

    x_last: jax.Array
    m1: jax.Array
    m2: jax.Array


def unipc_init(x: jax.Array) -> UniPCState:
    """The state before step 0 (its fields are multiplied by zero coefficients at steps 0, 1)."""
    z = jnp.zeros_like(x)
    return UniPCState(z, z, z)


def _predictor_orders(n: int) -> np.ndarray:
    i = np.arange(n)
    return np.minimum(np.minimum(SOLVER_ORDER, i + 1), n - i)


def _bh_weights(h: float, order: int) -> tuple[float, np.ndarray]:
    """B(h) and the right-hand side b_1..b_order of UniPC's order conditions, for hh = -h.

    With phi_1 = expm1(hh), g_1 = phi_1 / hh - 1 and g_{k+1} = g_k / hh - 1 / (k + 1)!, the
    conditions read b_k = k! g_k / B(h) (bh2: B(h) = expm1(hh)).
    """
    hh = -h
    b_h = np.expm1(hh)
    g = np.expm1(hh) / hh - 1.0
    b = []
    fact = 1.0
    for k in range(1, order + 1):
        b.append(fact * g / b_h)
        fact *= k + 1
        g = g / hh - 1.0 / fact
    return b_h, np.array(b)


def unipc_tables(sigmas: np.ndarray) -> np.ndarray:
    """float64 [N, 9]: per step i, sigma_i and the corrector and predictor coefficients.

    sigmas: float64 [N + 1], decreasing in (0, 1) with sigmas[N] = 0 (`FlowSchedule.sigmas`).
    Columns (names are module constants):
      SIGMA: sigma_i, for m_i = x_i - sigma_i v_i.
      KX, KLAST, KM1, KM2, KMI: x_c = KX x_i + KLAST x_last + KM1 m_{i-1} + KM2 m_{i-2} + KMI m_i
        (step 0: KX = 1, the rest 0; later steps: KX = 0, UniC).
      PA, PMI, PM1: x_{i+1} = PA x_c + PMI m_i + PM1 m_{i-1} (UniP).
    """
    sig = np.asarray(sigmas, np.float64)
    n = sig.shape[0] - 1
    if n < 1 or sig[-1] != 0 or not np.all(np.diff(sig) < 0) or not 0 < sig[0] < 1:
        raise ValueError(
            "sigmas must be [N + 1] (N >= 1), strictly decreasing in (0, 1) and end with 0"
        )
    with np.errstate(divide="ignore"):
        lam = np.log1p(-sig) - np.log(sig)  # lam[N] = +inf, never used below
    orders = _predictor_orders(n)
    rows = np.zeros((n, NUM_COLUMNS))
    rows[:, SIGMA] = sig[:n]
    for i in range(n):
        r = rows[i]
        # Corrector: from sigma_{i-1} (s0) to sigma_i (t), of the order of step i - 1's predictor.
        if i == 0:
            r[KX] = 1.0
        else:
            q = orders[i - 1]
            h = lam[i] - lam[i - 1]
            alpha_t = 1.0 - sig[i]
            b_h, b = _bh_weights(h, q)
            phi_1 = np.expm1(-h)
            if q == 1:
                rho = np.array([0.5])
            else:  # q == 2: D1 = (m_{i-2} - m_{i-1}) / rk, solve [[1, 1], [rk, 1]] rho = b
                rk = (lam[i - 2] - lam[i - 1]) / h
                rho = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), b)
            r[KLAST] = sig[i] / sig[i - 1]
            r[KMI] = -alpha_t * b_h * rho[-1]
            r[KM1] = -alpha_t * phi_1 + alpha_t * b_h * rho[-1]
            if q == 2:
                r[KM2] = -alpha_t * b_h * rho[0] / rk
                r[KM1] += alpha_t * b_h * rho[0] / rk
        # Predictor: from sigma_i (s0) to sigma_{i+1} (t).
        p = orders[i]
        if sig[i + 1] == 0:
            # lambda_t = inf: phi_1 = -1 and the order-1 step lands on the data prediction.
            assert p == 1, "the final step is first order (lower_order_final)"
            r[PA], r[PMI], r[PM1] = 0.0, 1.0, 0.0
            continue
        h = lam[i + 1] - lam[i]
        alpha_t = 1.0 - sig[i + 1]
        b_h = np.expm1(-h)
        r[PA] = sig[i + 1] / sig[i]
        r[PMI] = -alpha_t * b_h  # bh2: phi_1 == B(h)
        if p == 2:  # D1 = (m_{i-1} - m_i) / rk with the fixed weight 1/2 of order 2
            rk = (lam[i - 1] - lam[i]) / h
            r[PMI] += alpha_t * b_h * 0.5 / rk
            r[PM1] = -alpha_t * b_h * 0.5 / rk
    if not np.all(np.isfinite(rows)):
        raise ValueError("UniPC coefficients are not finite for these sigmas")
    return rows


def unipc_step(
    row: jax.Array, state: UniPCState, x: jax.Array, v: jax.Array
) -> tuple[jax.Array, UniPCState]:
    """One UniPC step: x [B, F, H, W, C] (the model's input), v its velocity, row [9] of step i.

    Returns x_{i+1} and the new state; float arithmetic in x's dtype.
    """
    row = row.astype(x.dtype)
    v = v.astype(x.dtype)
    m = x - row[SIGMA] * v
    x_c = (
        row[KX] * x
        + row[KLAST] * state.x_last
        + row[KM1] * state.m1
        + row[KM2] * state.m2
        + row[KMI] * m
    )
    x_next = row[PA] * x_c + row[PMI] * m + row[PM1] * state.m1
    return x_next, UniPCState(x_last=x_c, m1=m, m2=state.m1)
