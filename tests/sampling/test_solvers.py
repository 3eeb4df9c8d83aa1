"""UniPC and Euler full solves against float64 NumPy step-by-step references and diffusers."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")  # a test extra, absent on the GPU image
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from fpsa_jax.sampling import euler_tables, flow_schedule, sample, unipc_tables
from tests.sampling.reference import WanUniPC, reference_sample, wan_schedule
from tests.sampling.toy import inputs, rel_err, toy_velocity


def jax_model(x, t, ctx, attention):
    return toy_velocity(jnp, x, t, ctx, attention)


def np_model(x, t, ctx, attention):
    return toy_velocity(np, x, t, ctx, attention)


@pytest.mark.parametrize("solver", ["unipc", "euler"])
@pytest.mark.parametrize("num_steps,shift", [(1, 5.0), (2, 5.0), (3, 1.0), (12, 5.0), (20, 8.0)])
def test_full_solve_matches_float64_wan_reference(solver, num_steps, shift):
    noise, ctx, neg = inputs(batch=2)
    kw = dict(num_steps=num_steps, shift=shift, guide_scale=4.0, solver=solver)
    got = sample(jax_model, noise, ctx, neg, **kw)
    want = reference_sample(np_model, noise, ctx, neg, **kw)
    assert got.dtype == jnp.float32 and got.shape == noise.shape
    assert rel_err(got, want) <= 1e-5


def test_unipc_reference_agrees_with_diffusers_unipc_on_wans_sigmas():
    # diffusers' UniPC with flow sigmas is the code Wan's solver was converted from; given Wan's
    # sigmas and timesteps it must step exactly like the float64 reference (and our solver).
    n, shift = 10, 5.0
    sigmas, timesteps = wan_schedule(n, shift)
    noise, ctx, _ = inputs(batch=1)
    sched = UniPCMultistepScheduler(
        num_train_timesteps=1000,
        solver_order=2,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        predict_x0=True,
        solver_type="bh2",
        lower_order_final=True,
    )
    sched.set_timesteps(n)
    sched.sigmas = torch.tensor(sigmas, dtype=torch.float32)
    sched.timesteps = torch.tensor(timesteps)
    sched.set_begin_index(0)
    x_ref = np.asarray(noise, np.float64)
    x_dif = torch.tensor(noise, dtype=torch.float64)
    ref = WanUniPC(sigmas)
    for i in range(n):
        t = np.full((1,), float(timesteps[i]))
        x_ref = ref.step(np_model(x_ref, t, ctx.astype(np.float64), None), x_ref)
        v = torch.from_numpy(np_model(x_dif.numpy(), t, ctx.astype(np.float64), None))
        x_dif = sched.step(v, sched.timesteps[i], x_dif).prev_sample
    assert rel_err(x_dif.numpy(), x_ref) <= 1e-6
    got = sample(jax_model, noise, ctx, ctx, num_steps=n, shift=shift, guide_scale=1.0)
    assert rel_err(got, x_dif.numpy()) <= 1e-5


def test_euler_matches_diffusers_flow_match_euler_on_the_same_sigmas():
    n, shift = 8, 3.0
    sched_w = flow_schedule(n, shift)
    noise, ctx, _ = inputs(batch=1, seed=3)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(sigmas=list(sched_w.sigmas[:-1]))
    np.testing.assert_allclose(sched.sigmas.numpy(), sched_w.sigmas, rtol=0, atol=0)
    x = torch.tensor(noise)
    for i in range(n):
        t = np.full((1,), float(sched_w.timesteps[i]))
        v = torch.from_numpy(np_model(x.numpy(), t, ctx, None).astype(np.float32))
        x = sched.step(v, sched.timesteps[i], x).prev_sample
    got = sample(
        jax_model, noise, ctx, ctx, num_steps=n, shift=shift, guide_scale=1.0, solver="euler"
    )
    assert rel_err(got, x.numpy()) <= 1e-5


def test_final_unipc_step_lands_on_the_data_prediction():
    rows = unipc_tables(flow_schedule(7, 5.0).sigmas)
    np.testing.assert_array_equal(rows[-1, -3:], [0.0, 1.0, 0.0])  # x_N = m_{N-1}


@pytest.mark.parametrize(
    "tables,sigmas",
    [
        (unipc_tables, [0.5]),
        (unipc_tables, [0.9, 0.95, 0.0]),
        (unipc_tables, [0.9, 0.5, 0.1]),  # UniPC's last step needs sigma 0
        (unipc_tables, [1.0, 0.5, 0.0]),  # lambda(1) = -inf
        (euler_tables, [0.5]),
        (euler_tables, [0.9, 0.95, 0.0]),
    ],
)
def test_bad_sigmas_are_rejected(tables, sigmas):
    with pytest.raises(ValueError, match="sigmas"):
        tables(np.array(sigmas))
