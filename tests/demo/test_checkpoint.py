"""Demo checkpoints: the embedded ones are small, load, and match the demo preset; the format
round-trips and refuses what is not one."""

import dataclasses

import jax
import numpy as np
import pytest

from fpsa_jax.attention import StepSchedule
from fpsa_jax.config import WanConfig
from fpsa_jax.demo import (
    DEFAULT_CHECKPOINT,
    DENSE_CHECKPOINT,
    DemoCheckpoint,
    Sampling,
    is_demo_checkpoint,
    load_demo,
    save_demo,
)
from fpsa_jax.model.wan import init_params

SMALL = WanConfig.preset("demo", dim=32, ffn_dim=64, num_heads=2, num_layers=1)


def test_embedded_checkpoints_fit_in_20_mb_together():
    sizes = [p.stat().st_size for p in (DEFAULT_CHECKPOINT, DENSE_CHECKPOINT)]
    assert sum(sizes) <= 20 * 2**20, sizes


def test_embedded_checkpoints_are_the_demo_model_before_and_after_fpsa_fine_tuning():
    qat, dense = load_demo(), load_demo(DENSE_CHECKPOINT)
    for ckpt in (qat, dense):
        assert ckpt.config == WanConfig.preset("demo")
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(ckpt.params))
    assert qat.schedule == StepSchedule.preset("demo") and dense.schedule is None
    assert qat.sampling == dense.sampling
    assert qat.info["step"] > 0 and dense.info["step"] > 0


def test_save_and_load_round_trip(tmp_path):
    params = jax.device_get(init_params(SMALL, jax.random.key(0)))
    ckpt = DemoCheckpoint(
        SMALL, params, StepSchedule.preset("demo"), Sampling(7, 2.0, 3.0), {"a": 1}
    )
    path = save_demo(tmp_path / "m.safetensors", ckpt)
    assert is_demo_checkpoint(path) and not list(tmp_path.glob(".*"))
    back = load_demo(path)
    assert (back.config, back.schedule, back.sampling, back.info) == (
        ckpt.config,
        ckpt.schedule,
        ckpt.sampling,
        ckpt.info,
    )
    for x, y in zip(jax.tree.leaves(back.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(x, y)


def test_what_is_not_a_demo_checkpoint_is_refused(tmp_path):
    from safetensors.numpy import save_file

    with pytest.raises(FileNotFoundError, match="demo checkpoint not found"):
        load_demo(tmp_path / "missing.safetensors")
    other = tmp_path / "other.safetensors"
    save_file({"x": np.zeros(2, np.float32)}, other)
    assert not is_demo_checkpoint(other)
    with pytest.raises(ValueError, match="is not a demo checkpoint"):
        load_demo(other)
    with pytest.raises(ValueError, match="demo checkpoints are .safetensors files"):
        save_demo(tmp_path / "m.npz", None)
    params = jax.device_get(init_params(SMALL, jax.random.key(0)))
    wrong = DemoCheckpoint(SMALL.replace(dim=64, ffn_dim=128), params, None, Sampling(), {})
    save_demo(tmp_path / "wrong.safetensors", wrong)
    with pytest.raises(ValueError, match="parameters do not match its WanConfig"):
        load_demo(tmp_path / "wrong.safetensors")


def test_sampling_settings_are_data():
    assert dataclasses.asdict(Sampling()) == {
        "num_steps": 20,
        "shift": 3.0,
        "guide_scale": 4.0,
        "solver": "unipc",
    }
