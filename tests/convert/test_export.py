"""save_converted / load_converted round trips and atomic writes; the CLI end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest

from fpsa_jax.convert import (
    CheckpointError,
    load_converted,
    load_wan_checkpoint,
    save_converted,
)
from tests.convert.helpers import assert_tree_equal, write_safetensors

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def converted(tmp_path_factory, state):
    """(source file, config, bf16 params) of the tiny original-layout checkpoint."""
    path = write_safetensors(tmp_path_factory.mktemp("src") / "model.safetensors", state)
    config, params = load_wan_checkpoint(path, jnp.bfloat16, num_heads=2)
    return path, config, params


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_save_then_load_is_bit_for_bit(tmp_path, state, dtype):
    path = write_safetensors(tmp_path / "model.safetensors", state)
    config, params = load_wan_checkpoint(path, dtype, num_heads=2)
    save_converted(tmp_path / "out", config, params)
    config_back, params_back = load_converted(tmp_path / "out")
    assert config_back == config
    assert_tree_equal(params_back, params)


def test_failed_save_leaves_no_destination_and_no_temp_dir(tmp_path, converted, monkeypatch):
    _, config, params = converted

    def failing_save(self, directory, *args, **kwargs):
        Path(directory).mkdir(parents=True)
        (Path(directory) / "partial").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_converted(tmp_path / "out", config, params)
    assert os.listdir(tmp_path) == []


def test_failed_overwrite_keeps_the_old_destination(tmp_path, converted, monkeypatch):
    _, config, params = converted
    save_converted(tmp_path / "out", config, params)
    monkeypatch.setattr(
        ocp.StandardCheckpointer,
        "save",
        lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")),
    )
    with pytest.raises(OSError, match="disk full"):
        save_converted(tmp_path / "out", config, params, overwrite=True)
    assert os.listdir(tmp_path) == ["out"]
    assert_tree_equal(load_converted(tmp_path / "out")[1], params)


def test_non_empty_destination_needs_overwrite(tmp_path, converted, state):
    _, config, params = converted
    (tmp_path / "out").mkdir()
    save_converted(tmp_path / "out", config, params)  # an empty directory is fine
    with pytest.raises(FileExistsError, match="not empty; pass --overwrite"):
        save_converted(tmp_path / "out", config, params)
    params32 = load_wan_checkpoint(converted[0], jnp.float32, num_heads=2)[1]
    save_converted(
        tmp_path / "out", config.replace(param_dtype="float32"), params32, overwrite=True
    )
    assert_tree_equal(load_converted(tmp_path / "out")[1], params32)
    assert os.listdir(tmp_path) == ["out"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        save_converted(tmp_path / "file", config, params)


def test_params_that_do_not_match_the_config_are_not_saved(tmp_path, converted):
    _, config, params = converted
    with pytest.raises(CheckpointError, match="params do not match the config"):
        save_converted(tmp_path / "out", config.replace(ffn_dim=48), params)
    assert not (tmp_path / "out").exists()


def test_load_converted_of_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a converted checkpoint"):
        load_converted(tmp_path / "nothing")


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "fpsa_jax.convert", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_round_trip_matches_load_wan_checkpoint(tmp_path, converted):
    src, config, params = converted
    result = _cli("--src", str(src), "--dst", str(tmp_path / "out"), "--num_heads", "2")
    assert result.returncode == 0, result.stderr
    assert "original key layout" in result.stdout and "bfloat16" in result.stdout
    assert f"{config.num_params():,}" in result.stdout
    config_back, params_back = load_converted(tmp_path / "out")
    assert config_back == config
    assert_tree_equal(params_back, params)
    # A second run refuses to overwrite, before reading anything.
    again = _cli("--src", str(src), "--dst", str(tmp_path / "out"), "--num_heads", "2")
    assert again.returncode != 0 and "--overwrite" in again.stderr


def test_cli_help_explains_every_flag():
    result = _cli("--help")  # absl exits 1 after printing the help
    for flag in ("--src", "--dst", "--dtype", "--num_heads", "--linear_quant", "--[no]overwrite"):
        assert flag in result.stdout


def test_cli_rejects_positional_arguments(tmp_path, converted):
    result = _cli("--src", str(converted[0]), "--dst", str(tmp_path / "out"), "stray")
    assert result.returncode != 0 and "unexpected arguments: ['stray']" in result.stderr
    assert not (tmp_path / "out").exists()


# -- FP8 block linears (--linear_quant fp8) ---------------------------------------------------


def _forward(config, params, linear_impl="emulated"):
    import numpy as np

    from fpsa_jax.model.wan import WanModel

    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1, 2, 4, 4, config.in_dim)).astype(np.float32)
    context = rng.standard_normal((1, 3, config.text_dim)).astype(np.float32)
    model = WanModel(config, linear_impl=linear_impl)
    return model.apply({"params": params}, latents, np.array([500.0], np.float32), context)


def test_cli_fp8_checkpoint_halves_the_linears_and_equals_quantizing_at_load(tmp_path, converted):
    import numpy as np

    from fpsa_jax.model.fp8_linear import FP8, quantize_linear_weights

    src, config, params = converted
    result = _cli(
        "--src", str(src), "--dst", str(tmp_path / "fp8"), "--num_heads", "2",
        "--linear_quant", "fp8",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "FP8 block linears + float32 scales" in result.stdout
    config_back, params_back = load_converted(tmp_path / "fp8")
    assert config_back == config.replace(linear_quant="fp8")
    kernel = params_back["blocks"]["ffn"]["fc1"]["kernel"]
    assert kernel.dtype == FP8
    assert kernel.nbytes * 2 == params["blocks"]["ffn"]["fc1"]["kernel"].nbytes
    at_load = quantize_linear_weights(params)
    assert_tree_equal(params_back, at_load)
    np.testing.assert_array_equal(
        _forward(config_back, params_back), _forward(config_back, at_load)
    )


def test_fp8_params_and_a_config_that_does_not_expect_them_are_refused(tmp_path, converted):
    from fpsa_jax.model.fp8_linear import quantize_linear_weights

    _, config, params = converted
    quantized = quantize_linear_weights(params)
    with pytest.raises(CheckpointError, match="hold FP8 block linears .*linear_quant='none'"):
        save_converted(tmp_path / "a", config, quantized)
    with pytest.raises(CheckpointError, match="hold float block linears .*linear_quant='fp8'"):
        save_converted(tmp_path / "b", config.replace(linear_quant="fp8"), params)
    # A config.json edited after the conversion is caught on load.
    save_converted(tmp_path / "c", config.replace(linear_quant="fp8"), quantized)
    config.save(tmp_path / "c" / "config.json")
    with pytest.raises(CheckpointError, match="hold FP8 block linears .*linear_quant='none'"):
        load_converted(tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
