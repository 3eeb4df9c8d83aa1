"""Shared pytest set-up: `gpu` tests run only where JAX sees a GPU; hypothesis without deadlines
(JIT compilation makes first examples slow); the tiny Wan DiT every model test starts from."""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from fpsa_jax.config import WanConfig  # noqa: E402

settings.register_profile("fpsa", deadline=None, print_blob=True)
settings.load_profile("fpsa")

# The tests' tiny Wan DiT: head_dim 12, patch (1, 2, 2), float32 compute. Tests needing another
# size take `TINY_WAN.replace(...)`, so every test model is this one or a stated edit of it. A
# constant, not a fixture: module-level helpers, tables and subprocess scripts import it.
TINY_WAN = WanConfig(
    dim=24,
    ffn_dim=32,
    num_heads=2,
    num_layers=2,
    in_dim=4,
    out_dim=4,
    text_dim=16,
    text_len=12,
    dtype="float32",
)


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a GPU (marker `gpu`)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
