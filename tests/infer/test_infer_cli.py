"""`python -m infer` end to end on the embedded default, and its refusals of bad flags."""

import json
import subprocess
import sys
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _infer(*flags, cwd):
    return subprocess.run(
        [sys.executable, "-m", "infer", *flags],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"},
    )


def test_fpsa_run_writes_a_playable_video_and_latents(tmp_path):
    video, latents = tmp_path / "v.mp4", tmp_path / "z.npy"
    result = _infer(
        "--size=64*32",
        "--frame_num=5",
        "--sample_steps=3",
        "--attention=fpsa",
        f"--save_file={video}",
        f"--save_latents={latents}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"wrote 5 frames at 16 fps to {video}" in result.stdout
    assert "attention wan-480p" in result.stdout and "time per phase" in result.stdout
    reader = imageio_ffmpeg.read_frames(str(video))
    meta = next(reader)
    frames = list(reader)
    assert meta["size"] == (64, 32) and len(frames) == 5
    z = np.load(latents)
    assert z.shape == (1, 2, 4, 8, 16) and np.isfinite(z).all() and z.std() > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--size=60*32"], "multiples of 16"),
        (["--size=64by32"], "--size must look like 832*480"),
        (["--frame_num=4"], "frame count must be 4k+1"),
        (["--sample_steps=0"], "--sample_steps must be >= 1"),
        (["--attention=fpsa", "--schedule=wan-9000p"], "unknown StepSchedule preset"),
        (["--schedule=wan-480p"], "--schedule needs --attention=fpsa"),
        (["--save_file=out.avi"], "--save_file must end in .mp4"),
        (["--ckpt_dir=/does/not/exist"], "model directory not found"),
    ],
)
def test_bad_flags_are_refused_with_the_reason(tmp_path, flags, message):
    result = _infer(*flags, cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_sequence_parallel_sampling_matches_one_device():
    """The denoising loop on a (data=2, seq=2) mesh of forced CPU devices: CFG batch split over
    data, self-attention Ulysses over seq (each device sees all 16 tokens for 1 of 2 heads)."""
    env = {
        "PATH": "/usr/bin:/bin",
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    }
    script = Path(__file__).with_name("multidevice_sampling.py")
    result = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["inside"] and all(shape == [1, 16, 1, 32] for shape in out["inside"])
    assert out["rel"] < 1e-5  # float32, same math per head; only data movement differs
