"""Seeds as Wan's generate.py takes them: any int in [0, 2^63) names one noise draw, and a
negative seed asks for a random one (`resolve_seed`, printed by the app so the video can be made
again).

`seed_key` is the one place a seed becomes a JAX PRNG key. `jax.random.key(seed)` keeps only the
low 32 bits of a seed without 64-bit mode (2^32 gives the key of 0): here the high 32 bits are
kept too, as 64-bit JAX keeps them, so no two seeds share a key, and seeds below 2^32 keep the key
`jax.random.key(seed)` always gave them (the same videos as before).
"""

from __future__ import annotations

import random

import jax
import numpy as np

from fpsa_jax.ranges import Range

SEEDS = Range(0, 2**63, hi_open=True, integer=True)


def check_seed(seed: int, name: str = "seed") -> int:
    """`seed` as an int when it lies in [0, 2^63), else ValueError naming `name`."""
    return SEEDS.check(name, seed)


def resolve_seed(seed: int) -> int:
    """`seed` itself when >= 0; a random seed in [0, 2^63) when negative (Wan's generate.py:
    `random.randint(0, sys.maxsize)`)."""
    if seed < 0:
        return random.randint(0, 2**63 - 1)
    return check_seed(seed)


def seed_key(seed: int) -> jax.Array:
    """The PRNG key of `seed` in [0, 2^64) (a typed key array, shape []): `jax.random.key(seed)`
    below 2^32; above, threefry's key of the seed's two 32-bit halves [high, low], the key
    `jax.random.key` gives in 64-bit mode."""
    seed = Range(0, 2**64, hi_open=True, integer=True).check("seed", seed)
    if seed < 2**32:
        return jax.random.key(seed)
    halves = np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)
    return jax.random.wrap_key_data(halves, impl="threefry2x32")
