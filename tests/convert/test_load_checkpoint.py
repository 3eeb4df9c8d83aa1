"""load_wan_checkpoint: every leaf is the expected transform of its source tensor, in every
file form and key layout, and the config is inferred from shapes and config.json."""

from __future__ import annotations

import json
import tracemalloc

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from fpsa_jax.config import WanConfig
from fpsa_jax.convert import load_wan_checkpoint
from tests.convert.helpers import assert_tree_equal, write_safetensors, write_sharded
from tests.convert.wan_state import (
    TINY,
    expected_params,
    make_original_state_dict,
    to_diffusers_keys,
)

TINY_CONFIG = WanConfig(**TINY)


def _cast(tree, dtype):
    return jax.tree.map(lambda x: np.asarray(x).astype(dtype), tree)


def test_original_layout_float32_is_exact(tmp_path, state):
    path = write_safetensors(tmp_path / "model.safetensors", state)
    config, params = load_wan_checkpoint(path, jnp.float32, num_heads=2)
    assert config == TINY_CONFIG.replace(param_dtype="float32")
    assert_tree_equal(params, expected_params(state))
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))


def test_bfloat16_params_are_round_to_nearest_casts(tmp_path, state):
    path = write_safetensors(tmp_path / "model.safetensors", state)
    config, params = load_wan_checkpoint(path, num_heads=2)  # default dtype bfloat16
    assert config.param_dtype == "bfloat16" and config.dtype == "bfloat16"
    assert_tree_equal(params, _cast(expected_params(state), ml_dtypes.bfloat16))


@pytest.mark.parametrize(
    "stored, target",
    [
        (ml_dtypes.bfloat16, jnp.float32),
        (ml_dtypes.bfloat16, jnp.bfloat16),
        (np.float16, jnp.float32),
        (np.float16, jnp.float16),
    ],
)
def test_half_precision_checkpoints_convert_exactly(tmp_path, state, stored, target):
    stored_state = _cast(state, stored)
    path = write_safetensors(tmp_path / "model.safetensors", stored_state)
    _, params = load_wan_checkpoint(path, target, num_heads=2)
    assert_tree_equal(params, _cast(expected_params(stored_state), target))


def test_diffusers_layout_gives_the_same_params_as_original(tmp_path, state):
    original = write_safetensors(tmp_path / "orig.safetensors", state)
    renamed = write_safetensors(tmp_path / "diff.safetensors", to_diffusers_keys(state))
    config_a, params_a = load_wan_checkpoint(original, jnp.float32, num_heads=2)
    config_b, params_b = load_wan_checkpoint(renamed, jnp.float32, num_heads=2)
    assert config_a == config_b
    assert_tree_equal(params_a, params_b)


@pytest.mark.parametrize("form", ["single", "sharded", "pipeline", "pth"])
def test_real_diffusers_save_pretrained_checkpoints(diffusers_checkpoints, state, form):
    # num_heads comes from config.json (num_attention_heads); a .pth has none beside it, and
    # dim 24 is no multiple of 128, so the test passes it.
    kwargs = {"num_heads": 2} if form == "pth" else {}
    config, params = load_wan_checkpoint(diffusers_checkpoints[form], jnp.float32, **kwargs)
    assert config == TINY_CONFIG.replace(param_dtype="float32")
    assert_tree_equal(params, expected_params(state))


def test_sharded_index_file_and_its_directory_load_the_same(tmp_path, state):
    index = write_sharded(tmp_path / "wan", state)
    (tmp_path / "wan" / "config.json").write_text(
        json.dumps(
            {
                "_class_name": "WanModel",
                "model_type": "t2v",
                "dim": 24,
                "num_heads": 2,
                "ffn_dim": 32,
                "num_layers": 2,
                "in_dim": 4,
                "out_dim": 4,
                "freq_dim": 256,
                "text_len": 77,
                "eps": 1e-5,
            }
        )
    )
    config, params = load_wan_checkpoint(index, jnp.float32)
    assert config == TINY_CONFIG.replace(param_dtype="float32", text_len=77, eps=1e-5)
    assert_tree_equal(params, expected_params(state))
    config_dir, params_dir = load_wan_checkpoint(tmp_path / "wan", jnp.float32)
    assert config_dir == config
    assert_tree_equal(params_dir, params)


def test_unindexed_shards_in_a_directory_are_read_together(tmp_path, state):
    names = sorted(state)
    write_safetensors(tmp_path / "a.safetensors", {n: state[n] for n in names[::2]})
    write_safetensors(tmp_path / "b.safetensors", {n: state[n] for n in names[1::2]})
    _, params = load_wan_checkpoint(tmp_path, jnp.float32, num_heads=2)
    assert_tree_equal(params, expected_params(state))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(qk_norm=False),
        dict(cross_attn_norm=False),
        dict(
            in_dim=6,
            out_dim=3,
            patch_size=(2, 1, 2),
            num_layers=3,
            text_dim=8,
            freq_dim=32,
            ffn_dim=40,
        ),
    ],
)
@pytest.mark.parametrize("diffusers", [False, True])
def test_config_is_inferred_from_shapes(tmp_path, overrides, diffusers):
    state = make_original_state_dict(overrides, seed=1)
    file_state = to_diffusers_keys(state) if diffusers else state
    path = write_safetensors(tmp_path / "model.safetensors", file_state)
    config, params = load_wan_checkpoint(path, jnp.float32, num_heads=2)
    assert config == WanConfig(**{**TINY, **overrides}, param_dtype="float32")
    assert_tree_equal(params, expected_params(state))


def test_num_heads_falls_back_to_head_dim_128(tmp_path):
    state = make_original_state_dict(dict(dim=256, ffn_dim=16, num_layers=1), seed=2)
    path = write_safetensors(tmp_path / "model.safetensors", state)
    config, _ = load_wan_checkpoint(path, jnp.float32)
    assert (config.dim, config.num_heads) == (256, 2)
    config, _ = load_wan_checkpoint(path, jnp.float32, num_heads=4)  # the argument wins
    assert config.num_heads == 4


def test_num_heads_comes_from_original_config_json(tmp_path, state):
    write_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", state)
    (tmp_path / "config.json").write_text(json.dumps({"dim": 24, "num_heads": 4}))
    config, _ = load_wan_checkpoint(tmp_path / "diffusion_pytorch_model.safetensors")
    assert config.num_heads == 4


def test_conversion_streams_tensor_by_tensor(tmp_path):
    """Host memory (numpy allocations) stays below one stacked leaf, a fifth of the checkpoint:
    layers go to the device as they are read; nothing reads a whole leaf or file into memory.
    (The first load also traces and compiles the stacking: ~4 MB here, counted in the peak.)"""
    state = make_original_state_dict(dict(dim=256, ffn_dim=512, num_layers=16), seed=3)
    size = sum(v.nbytes for v in state.values())
    largest_leaf = 16 * 256 * 512 * 4  # blocks.ffn.fc1.kernel in float32
    path = write_safetensors(tmp_path / "model.safetensors", state)
    del state
    tracemalloc.start()
    try:
        load_wan_checkpoint(path, jnp.float32)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < largest_leaf < 0.2 * size
