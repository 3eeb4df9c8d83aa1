"""Seeds (`fpsa_jax.seeds`): no two seeds share a noise draw, seeds below 2^32 keep the draw
they always had, and a negative seed is a random one (Wan's generate.py)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from fpsa_jax.config import WanConfig
from fpsa_jax.demo import load_demo
from fpsa_jax.demo.generate import generate
from fpsa_jax.demo.generate import initial_noise as demo_noise
from fpsa_jax.pipeline import T2VRequest, initial_noise
from fpsa_jax.seeds import check_seed, resolve_seed, seed_key
from fpsa_jax.training import TrainConfig
from train.loop import RunSettings


def test_seeds_past_2_to_the_32_have_their_own_noise():
    """Before: jax.random.key keeps the low 32 bits without 64-bit mode, so 2^32 drew the noise
    of seed 0 and 2^32 + 5 that of 5, silently."""
    shape = (1, 2, 4, 4, 16)
    for big, small in ((2**32, 0), (2**32 + 5, 5), (2**63 - 1, 2**32 - 1)):
        assert not np.array_equal(initial_noise(big, shape), initial_noise(small, shape))
        assert not np.array_equal(demo_noise([big]), demo_noise([small]))
    keys = {tuple(np.asarray(jax.random.key_data(seed_key(s)))) for s in (0, 1, 2**32, 2**32 + 1)}
    assert len(keys) == 4


def test_seeds_below_2_to_the_32_draw_what_they_always_drew():
    for seed in (0, 3, 2**32 - 1):
        np.testing.assert_array_equal(
            jax.random.key_data(seed_key(seed)), jax.random.key_data(jax.random.key(seed))
        )


def test_seeds_outside_0_to_2_to_the_63_are_refused_where_a_run_is_described(tmp_path):
    """Before: 2^63 raised an OverflowError inside denoising (after the model loaded)."""
    assert check_seed(2**63 - 1) == 2**63 - 1
    for bad in (2**63, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\^63\)"):
            check_seed(bad)
    with pytest.raises(ValueError, match=r"^T2VRequest.seed must be an int in \[0, 2\^63\), got"):
        T2VRequest("a prompt", width=32, height=32, frames=5, seed=2**63)
    with pytest.raises(ValueError, match=r"^RunSettings.seed must be an int in \[0, 2\^63\)"):
        RunSettings(tmp_path, WanConfig.preset("tiny"), TrainConfig(), seed=-1)
    with pytest.raises(ValueError, match=r"^seeds\[1\] must be an int in \[0, 2\^63\)"):
        generate(load_demo(), ["a", "b"], [0, 2**63], schedule=None)


def test_a_negative_seed_is_a_random_seed_in_range():
    drawn = {resolve_seed(-1) for _ in range(8)}
    assert len(drawn) > 1 and all(0 <= s < 2**63 for s in drawn)
    assert resolve_seed(7) == 7
