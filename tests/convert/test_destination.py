"""`python -m fpsa_jax.convert` and its destination: never the source or what a conversion did
not write, checked before the long read, temp folders of killed runs removed, SIGTERM cleaned up.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from fpsa_jax.convert import load_converted, load_wan_checkpoint, save_converted
from fpsa_jax.convert.destination import check_apart, clean_destination, converted_size
from fpsa_jax.model.fp8_linear import quantize_linear_weights
from fpsa_jax.outputs import OutputError, sibling_temp
from tests.convert.helpers import write_safetensors
from tests.convert.test_export import _cli
from tests.convert.wan_state import to_diffusers_keys
from tests.runtime_env import run_module
from tests.test_outputs import _dead_pid, _temp_of

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def model_dir(tmp_path, state):
    """A Wan2.1-style model folder: the DiT safetensors and a file that is not the DiT's."""
    folder = tmp_path / "Wan2.1-T2V-tiny"
    write_safetensors(folder / "diffusion_pytorch_model.safetensors", state)
    (folder / "Wan2.1_VAE.pth").write_bytes(b"vae weights")
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("where", ["same", "parent", "inside", "symlink"])
def test_overwrite_never_takes_a_destination_overlapping_the_source(tmp_path, model_dir, where):
    """Before: --dst=SRC or a parent of it with --overwrite deleted the weights (exit 0)."""
    before = _snapshot(tmp_path)
    if where == "symlink":
        (tmp_path / "link").symlink_to(model_dir)
    dst = {
        "same": model_dir,
        "parent": tmp_path,
        "inside": model_dir / "jax",
        "symlink": tmp_path / "link",
    }[where]
    how = {"same": "is", "parent": "contains", "inside": "lies inside", "symlink": "is"}[where]
    result = _cli("--src", str(model_dir), "--dst", str(dst), "--overwrite", "--num_heads", "2")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --dst {dst} {how} the source {model_dir}; writing it would delete the source: "
        "pick a destination outside it"
    )
    after = _snapshot(tmp_path)
    assert after == before


def test_check_apart_allows_siblings_and_files_beside_the_source(tmp_path, model_dir):
    check_apart(model_dir, tmp_path / "Wan2.1-T2V-tiny-jax")
    check_apart(model_dir / "diffusion_pytorch_model.safetensors", model_dir.parent / "out")
    with pytest.raises(OutputError, match="contains the source"):
        check_apart(model_dir / "diffusion_pytorch_model.safetensors", model_dir)


def test_overwrite_replaces_only_a_converted_checkpoint(tmp_path, model_dir, state):
    """The run never deletes what it did not write: a folder of other files stays."""
    other = tmp_path / "home"
    (other / "notes").mkdir(parents=True)
    (other / "notes" / "todo.txt").write_text("keep me")
    (other / "params").mkdir()
    result = _cli("--src", str(model_dir), "--dst", str(other), "--overwrite", "--num_heads", "2")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: destination {other} is not a converted checkpoint (it also holds notes); "
        "overwrite replaces only what a conversion wrote: remove it yourself or pick another "
        "destination"
    )
    assert (other / "notes" / "todo.txt").read_text() == "keep me"
    # A converted checkpoint is replaced.
    dst = tmp_path / "jax"
    for _ in range(2):
        done = _cli("--src", str(model_dir), "--dst", str(dst), "--overwrite", "--num_heads", "2")
        assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(dst)) == ["config.json", "params"]


def _patched_cli(patch: str, *args: str) -> subprocess.CompletedProcess:
    """The CLI with `args`, in a process that runs the code `patch` first (and imports only
    the runtime dependencies: converting safetensors needs no torch)."""
    return run_module("fpsa_jax.convert", *args, cwd=REPO, patch=patch, timeout=120)


# The checkpoint read replaced by a failure: what the CLI reports before reading.
_NO_READ = (
    "import fpsa_jax.convert.checkpoint as checkpoint\n"
    "def read(*a, **k):\n"
    "    raise SystemExit('READ THE CHECKPOINT')\n"
    "checkpoint.read_wan_checkpoint = read\n"
)


def test_an_unwritable_destination_is_refused_before_the_checkpoint_is_read(tmp_path, model_dir):
    (tmp_path / "file").write_text("x")
    dst = tmp_path / "file" / "jax"
    result = _patched_cli(_NO_READ, "--src", str(model_dir), "--dst", str(dst))
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --dst {dst}: {tmp_path / 'file'} is a file, not a directory"
    )
    assert "READ THE CHECKPOINT" not in result.stderr
    # And a good destination gets as far as the read.
    ok = _patched_cli(_NO_READ, "--src", str(model_dir), "--dst", str(tmp_path / "jax"))
    assert ok.stderr.strip().endswith("READ THE CHECKPOINT")


def test_a_destination_without_room_for_the_converted_tensors_is_refused(
    tmp_path, model_dir, state
):
    size = sum(v.size for v in state.values()) * 2  # bfloat16, the default --dtype
    no_room = (
        "import fpsa_jax.outputs as o, types\n"
        "o.shutil = types.SimpleNamespace(disk_usage=lambda p: types.SimpleNamespace(free=1000))\n"
    )
    result = _patched_cli(
        _NO_READ + no_room, "--src", str(model_dir), "--dst", str(tmp_path / "jax")
    )
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --dst needs {size} bytes but the filesystem of {tmp_path} has 1000 bytes free"
    )


class _Shapes(dict):
    """A `sources.TensorReader` of shapes only: name -> array."""

    def shape(self, name):
        return self[name].shape


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_the_room_checked_for_fp8_is_what_an_fp8_conversion_writes(tmp_path, state, layout):
    """--linear_quant fp8 writes one byte per block-linear weight (+ a float32 scale per output
    channel): the free-space check asks for that, not for the bf16 size."""
    config, params = load_wan_checkpoint(
        write_safetensors(tmp_path / "m.safetensors", state), jnp.bfloat16, num_heads=2
    )
    written = sum(x.nbytes for x in jax.tree.leaves(quantize_linear_weights(params)))
    names = state if layout == "original" else to_diffusers_keys(state)
    assert converted_size(_Shapes(names), jnp.bfloat16, "fp8") == written
    bf16 = sum(x.nbytes for x in jax.tree.leaves(params))
    assert converted_size(_Shapes(names), jnp.bfloat16) == bf16 > written


def test_the_next_run_removes_temp_folders_of_killed_conversions(tmp_path, model_dir, monkeypatch):
    """Before: every killed conversion left its hidden temp folder (up to a checkpoint's size)."""
    dst = tmp_path / "jax"
    stale = _temp_of(_dead_pid(), dst, True, monkeypatch)
    (stale / "params").mkdir()
    (stale / "params" / "big").write_bytes(b"0" * 1000)
    legacy = tmp_path / ".jax.tmp-abcd1234"  # not ours to judge: no host or process in it
    legacy.mkdir()
    result = _cli("--src", str(model_dir), "--dst", str(dst), "--num_heads", "2")
    assert result.returncode == 0, result.stderr
    assert f"removed 1 temp folder(s) of killed conversions to {dst}" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [model_dir.name, "jax", legacy.name]
    )


def test_a_replace_killed_between_its_renames_gets_the_old_destination_back(
    tmp_path, converted_tiny, monkeypatch
):
    config, params = converted_tiny
    dst = tmp_path / "jax"
    save_converted(dst, config, params)
    with monkeypatch.context() as m:
        m.setattr(os, "getpid", _dead_pid)
        old = sibling_temp(dst, is_dir=True, tag="old")
    os.replace(dst, old / dst.name)  # what _move_into_place does first, then it was killed
    assert clean_destination(dst) == [old]
    assert os.listdir(tmp_path) == ["jax"]
    assert load_converted(dst)[0] == config


@pytest.fixture()
def converted_tiny(state, tmp_path):
    path = write_safetensors(tmp_path / "src" / "model.safetensors", state)
    config, params = load_wan_checkpoint(path, jnp.bfloat16, num_heads=2)
    shutil.rmtree(tmp_path / "src")
    return config, params


def test_sigterm_during_the_save_leaves_no_temp_folder(tmp_path, model_dir):
    """SIGTERM arrives once orbax has written params/ into the temp folder."""
    dst = tmp_path / "jax"
    term_after_save = (
        "import os, signal\n"
        "import orbax.checkpoint as ocp\n"
        "save = ocp.StandardCheckpointer.save\n"
        "def save_then_term(self, *a, **k):\n"
        "    save(self, *a, **k)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "ocp.StandardCheckpointer.save = save_then_term\n"
    )
    result = _patched_cli(
        term_after_save, "--src", str(model_dir), "--dst", str(dst), "--num_heads", "2"
    )
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert "stopped by SIGTERM; cleaning up" in result.stderr
    assert sorted(os.listdir(tmp_path)) == [model_dir.name]


def test_a_converted_folder_gets_the_permissions_of_a_new_folder(tmp_path, state):
    """Before: the converted DST was the mkdtemp folder renamed into place: 0700 under any
    umask."""
    config, params = load_wan_checkpoint(
        write_safetensors(tmp_path / "m.safetensors", state), jnp.bfloat16, num_heads=2
    )
    before = os.umask(0o022)
    try:
        dst = save_converted(tmp_path / "jax", config, params)
    finally:
        os.umask(before)
    assert dst.stat().st_mode & 0o777 == 0o755
    assert (dst / "config.json").stat().st_mode & 0o777 == 0o644
