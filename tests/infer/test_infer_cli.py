"""`python -m infer` end to end on the embedded default, and its refusals of bad flags."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fpsa_jax.attention import IMPLS
from tests.conftest import subprocess_env

# A base dependency, absent only where the README's install did not run (the GPU image).
imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")

ROOT = Path(__file__).resolve().parents[2]


def _infer(*flags, cwd):
    return subprocess.run(
        [sys.executable, "-m", "infer", *flags],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=subprocess_env(),
    )


def _read_video(path):
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    return meta, list(reader)


def test_default_run_writes_a_captioned_demo_video(tmp_path):
    """The README's main command: no flags, the embedded demo model, FPSA as fine-tuned."""
    result = _infer(cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    video = tmp_path / "outputs" / "default_32x32_0_a_magenta_circle_moves_down_slowly_86531416.mp4"
    assert f"wrote 9 frames at 8 fps (32*32 upscaled 8x) to {video}" in result.stdout
    assert f"wrote the frames as a strip to {video.with_suffix('.png')}" in result.stdout
    assert "attention demo (as fine-tuned)" in result.stdout
    assert "the analytic evaluator reads the video as: colour=" in result.stdout
    meta, frames = _read_video(video)
    assert meta["size"] == (256, 256) and len(frames) == 9
    assert video.with_suffix(".png").stat().st_size > 0


def test_dense_run_with_flags_writes_video_and_array(tmp_path):
    video, array = tmp_path / "v.mp4", tmp_path / "z.npy"
    result = _infer(
        "--attention=dense",
        "--sample_steps=3",
        "--prompt=a red square moves left quickly",
        f"--save_file={video}",
        f"--save_latents={array}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "3 unipc steps, attention dense" in result.stdout
    assert len(_read_video(video)[1]) == 9
    z = np.load(array)
    assert z.shape == (1, 9, 32, 32, 3) and np.isfinite(z).all() and np.abs(z).max() <= 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--size=60*32"], "multiples of 16"),
        (["--size=64by32"], "--size must look like 832*480"),
        (["--frame_num=4"], "frame count must be 4k+1"),
        (["--sample_steps=0"], "--sample_steps must be >= 1"),
        (["--attention=fpsa", "--schedule=wan-9000p"], "unknown StepSchedule preset"),
        (["--schedule=/no/schedule.json"], "StepSchedule file not found"),
        (["--attention=dense", "--schedule=wan-480p"], "--schedule needs --attention=fpsa"),
        (["--size=64*64"], "the embedded demo model generates 9 frames of 32*32 only"),
        (["--save_file=out.avi"], "--save_file must end in .mp4"),
        (["--ckpt_dir=/does/not/exist"], "model directory not found"),
        # Checked while the flags parse, before the (missing) model directory is looked at.
        (
            ["--attention_impl=nonsense", "--ckpt_dir=/does/not/exist"],
            f"value should be one of <{'|'.join(IMPLS)}>",
        ),
        (["--linear_quant=int8"], "value should be one of <none|fp8>"),
        (["--linear_quant=fp8"], "--linear_quant fp8: FP8 linears (impl 'cublaslt') need"),
        (["--linear_quant=fp8", "--ckpt_dir=/does/not/exist"], "the backend is cpu"),
    ],
)
def test_bad_flags_are_refused_with_the_reason(tmp_path, flags, message):
    result = _infer(*flags, cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_help_lists_every_attention_impl(tmp_path):
    result = _infer("--help", cwd=tmp_path)
    assert f"--attention_impl: <{'|'.join(IMPLS)}>" in result.stdout


def test_sequence_parallel_sampling_matches_one_device():
    """The denoising loop on a (data=2, seq=2) mesh of forced CPU devices: CFG batch split over
    data, self-attention Ulysses over seq (each device sees all 16 tokens for 1 of 2 heads)."""
    env = subprocess_env("--xla_force_host_platform_device_count=8", pythonpath=False)
    script = Path(__file__).with_name("multidevice_sampling.py")
    result = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["inside"] and all(shape == [1, 16, 1, 32] for shape in out["inside"])
    assert out["rel"] < 1e-5  # float32, same math per head; only data movement differs
