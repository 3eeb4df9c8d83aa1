"""Independent float64 NumPy references for the sampling tests.

Written from Wan2.1's `FlowUniPCMultistepScheduler` (wan/utils/fm_solvers_unipc.py) as a plain
step-by-step state machine: lists of past data predictions, the generic R rho = b solve for every
order, lambdas recomputed at each step. It shares no code with `fpsa_jax.sampling`, which instead
folds every step into a row of precomputed coefficients.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def wan_schedule(num_steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas float64 [N + 1] holding float32 values, timesteps int64 [N]) as Wan builds them."""
    # The scheduler's training table: float32 torch tensor; sigma_max/min via .item().
    alphas = np.linspace(1, 1 / 1000, 1000)[::-1].copy()
    train = torch.from_numpy(1.0 - alphas).to(torch.float32)
    sigma_max, sigma_min = train[0].item(), train[-1].item()
    s = np.linspace(sigma_max, sigma_min, num_steps + 1).copy()[:-1]
    s = shift * s / (1 + (shift - 1) * s)
    timesteps = torch.from_numpy(s * 1000).to(torch.int64).numpy()
    sigmas = np.concatenate([s, [0]]).astype(np.float32).astype(np.float64)
    return sigmas, timesteps


class WanUniPC:
    """Wan's flow UniPC (order 2, predict_x0, bh2, lower_order_final) in float64."""

    def __init__(self, sigmas: np.ndarray, order: int = 2):
        self.sigmas = np.asarray(sigmas, np.float64)
        self.n = len(self.sigmas) - 1
        self.order = order
        self.outputs: list[np.ndarray | None] = [None] * order
        self.lower_order_nums = 0
        self.last_sample = None
        self.this_order = None
        self.i = 0

    def _lam(self, k: int) -> float:
        s = self.sigmas[k]
        return math.log(1 - s) - math.log(s) if s > 0 else math.inf

    def _weights(self, h: float, order: int, rks: list[float]):
        hh = -h
        h_phi_1 = math.expm1(hh)
        b_h = math.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        fac = 1
        rows, b = [], []
        r = np.array(rks)
        for k in range(1, order + 1):
            rows.append(r ** (k - 1))
            b.append(h_phi_k * fac / b_h)
            fac *= k + 1
            h_phi_k = h_phi_k / hh - 1 / fac
        return h_phi_1, b_h, np.stack(rows), np.array(b)

    def _predict(self, x: np.ndarray, order: int) -> np.ndarray:
        i = self.i
        m0 = self.outputs[-1]
        s_t, s_0 = self.sigmas[i + 1], self.sigmas[i]
        if s_t == 0:  # lambda_t = inf; the order-1 update reduces to the data prediction
            assert order == 1
            return m0.copy()
        h = self._lam(i + 1) - self._lam(i)
        rks, d1s = [], []
        for k in range(1, order):
            rk = (self._lam(i - k) - self._lam(i)) / h
            rks.append(rk)
            d1s.append((self.outputs[-(k + 1)] - m0) / rk)
        rks.append(1.0)
        h_phi_1, b_h, r, b = self._weights(h, order, rks)
        alpha_t = 1 - s_t
        out = s_t / s_0 * x - alpha_t * h_phi_1 * m0
        if d1s:
            rhos = np.array([0.5]) if order == 2 else np.linalg.solve(r[:-1, :-1], b[:-1])
            out = out - alpha_t * b_h * sum(w * d for w, d in zip(rhos, d1s, strict=True))
        return out

    def _correct(self, m_t: np.ndarray, x_last: np.ndarray, order: int) -> np.ndarray:
        i = self.i
        m0 = self.outputs[-1]
        s_t, s_0 = self.sigmas[i], self.sigmas[i - 1]
        h = self._lam(i) - self._lam(i - 1)
        rks, d1s = [], []
        for k in range(1, order):
            rk = (self._lam(i - k - 1) - self._lam(i - 1)) / h
            rks.append(rk)
            d1s.append((self.outputs[-(k + 1)] - m0) / rk)
        rks.append(1.0)
        h_phi_1, b_h, r, b = self._weights(h, order, rks)
        rhos = np.array([0.5]) if order == 1 else np.linalg.solve(r, b)
        alpha_t = 1 - s_t
        out = s_t / s_0 * x_last - alpha_t * h_phi_1 * m0
        corr = sum((w * d for w, d in zip(rhos[:-1], d1s, strict=True)), np.zeros_like(m0))
        return out - alpha_t * b_h * (corr + rhos[-1] * (m_t - m0))

    def step(self, v: np.ndarray, x: np.ndarray) -> np.ndarray:
        m = x - self.sigmas[self.i] * v
        if self.i > 0 and self.last_sample is not None:
            x = self._correct(m, self.last_sample, self.this_order)
        self.outputs = [*self.outputs[1:], m]
        order = min(self.order, self.n - self.i)
        self.this_order = min(order, self.lower_order_nums + 1)
        self.last_sample = x
        out = self._predict(x, self.this_order)
        self.lower_order_nums = min(self.lower_order_nums + 1, self.order)
        self.i += 1
        return out


def reference_sample(
    velocity,
    noise,
    context,
    negative_context,
    *,
    num_steps,
    shift,
    guide_scale,
    solver="unipc",
    attention_for_step=lambda i: None,
):
    """Float64 loop with two separate model calls per step (cond, then uncond), as Wan does."""
    sigmas, timesteps = wan_schedule(num_steps, shift)
    x = np.asarray(noise, np.float64)
    unipc = WanUniPC(sigmas)
    for i in range(num_steps):
        t = np.full((x.shape[0],), float(timesteps[i]))
        att = attention_for_step(i)
        c = velocity(x, t, np.asarray(context, np.float64), att)
        u = velocity(x, t, np.asarray(negative_context, np.float64), att)
        v = u + guide_scale * (c - u)
        if solver == "unipc":
            x = unipc.step(v, x)
        else:
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x
