"""Measured calibration on the tiny preset (random weights, float32): the device-side error sums
agree with errors recomputed in float64 NumPy (masked softmax against a brute-force mask) from the
recorded q, k, v of the same dense run, and the selected schedule honours its budget on those
recomputed errors. Sparse candidates without FP8 only, so that the oracle stays plain NumPy (FP8
candidates are measured in tests/train/test_calibrate_app.py)."""

import functools

import jax
import numpy as np
import pytest

from fpsa_jax.attention.calibration import candidate_configs, select_schedule
from fpsa_jax.attention.metrics import compare
from fpsa_jax.config import WanConfig
from fpsa_jax.model.random_weights import random_weights
from fpsa_jax.model.wan import init_params
from fpsa_jax.sampling import attention_probe, sample, wan_model_fn
from fpsa_jax.training.calibration import Sample, measure_step_errors
from tests.attention.fpsa_testlib import brute_token_mask, numpy_attention

CFG = WanConfig.preset("tiny", dtype="float32")
STEPS, GRID, TILE = 3, (3, 4, 4), (1, 2, 2)  # latents [1, 3, 8, 8, 16]; tile grid (3, 2, 2)
SETTINGS = dict(num_steps=STEPS, shift=5.0, guide_scale=5.0)


@pytest.fixture(scope="module")
def run():
    params = random_weights(functools.partial(init_params, CFG), jax.random.key(0), std=0.2)
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(1, *GRID[:1], 8, 8, CFG.in_dim)).astype(np.float32)
    context = rng.normal(size=(1, 5, CFG.text_dim)).astype(np.float32)
    negative = np.zeros((1, 1, CFG.text_dim), np.float32)
    return params, Sample(noise, context, negative)


def _recorded_inputs(params, sample_inputs):
    """[(q, k, v) each [num_layers, 2, L, N, D]] per step of the dense run, on the host."""
    records = []
    probe = attention_probe(lambda q, k, v, call: (q, k, v), records.append)
    fn = wan_model_fn(CFG, params, "xla", interceptor=probe)
    sample(fn, *sample_inputs, **SETTINGS)
    jax.effects_barrier()
    return [tuple(np.asarray(x) for x in r) for r in records]


def _host_rel_l2(q, k, v, config) -> float:
    """||o - o_dense|| / ||o_dense|| of one layer's output [B, L, N * D], in float64."""
    scale = q.shape[-1] ** -0.5
    mask = None if config is None else brute_token_mask(GRID, config.tile, config.window)
    o, ref = numpy_attention(q, k, v, scale, mask), numpy_attention(q, k, v, scale)
    b, length = q.shape[:2]
    return float(compare(o.reshape(b, length, 1, -1), ref.reshape(b, length, 1, -1)).rel_l2[0])


def test_measured_errors_match_the_recorded_inputs_and_the_schedule_honours_its_budget(run):
    params, inputs = run
    candidates = candidate_configs(TILE, GRID, [0.17, 0.5], [(1, 1, 1)], ["none"])
    assert len(candidates) == 3
    errors = measure_step_errors(
        CFG, params, [inputs], candidates, attention_impl="xla", **SETTINGS
    )
    assert errors.sums.shape == (STEPS, CFG.num_layers, len(candidates), 4, CFG.num_heads)
    assert errors.grid == GRID and (errors.rel_l2[:, :, 0] == 0).all()  # dense vs itself

    records = _recorded_inputs(params, inputs)
    assert len(records) == STEPS
    host = np.array(
        [
            [
                [_host_rel_l2(q[layer], k[layer], v[layer], c) for c in candidates]
                for layer in range(CFG.num_layers)
            ]
            for q, k, v in records
        ]
    )
    np.testing.assert_allclose(errors.rel_l2, host, rtol=1e-4, atol=1e-6)
    assert (host[:, :, 1:] > 1e-3).all()  # every candidate but dense is measurably off

    sparse = np.sort(errors.step_rel_l2[:, 1:].ravel())
    previous = np.inf
    for budget in (sparse[len(sparse) // 3], sparse[len(sparse) // 2], sparse[-1]):
        cal = select_schedule(errors, max_rel_l2=float(budget))
        for p in cal.phases:
            c = candidates.index(p.config)
            assert host[p.start : p.stop, :, c].max() <= budget * (1 + 1e-4)
        assert cal.mean_density <= previous
        previous = cal.mean_density
    assert previous < 1.0  # the loosest budget admits a sparse operator
