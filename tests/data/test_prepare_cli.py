"""`python -m train.prepare` in a subprocess: synthetic clips with the stand-in encoding, a
videos folder with the tiny real Wan model directory, and clear reports of what it refuses."""

import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from fpsa_jax.data import Loader, Records, StandInEncoder, synthetic_clip
from infer.video import save_video
from tests.app_probe import outcomes
from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[2]


def _prepare(*flags, cwd):
    return subprocess.run(
        [sys.executable, "-m", "train.prepare", *flags],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=subprocess_env(),
    )


def test_synthetic_standin_records_are_read_by_the_loader(tmp_path):
    out = tmp_path / "records"
    result = _prepare(
        "--synthetic=6",
        f"--out_dir={out}",
        "--size=64*32",
        "--frame_num=5",
        "--shard_size=4",
        "--standin_text_dim=8",
        "--seed=2",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "STAND-IN encoding" in result.stdout
    assert f"wrote 6 examples (2 shards, latents 2x4x8x16 bfloat16, text width 8) to {out}" in (
        result.stdout
    )
    records = Records(out)
    assert records.index["metadata"]["encoder"]["encoder"] == "stand-in"
    encoder = StandInEncoder(text_dim=8)
    for i, example in enumerate(records):
        video, caption, _ = synthetic_clip(2, i, 5, 32, 64)
        assert example.caption == caption
        want = encoder.encode_video(video).astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(example.latent, want)
    batches = list(Loader(out, batch_size=3, text_len=16, num_epochs=1))
    assert [b.latents.shape for b in batches] == [(3, 2, 4, 8, 16)] * 2
    assert sorted(np.concatenate([b.example_ids for b in batches])) == list(range(6))
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def _clip(folder, name, frames, caption, size=(40, 48)):
    rng = np.random.default_rng(len(name))
    video = np.clip(rng.normal(0, 0.3, (frames, size[1], size[0], 3)), -1, 1).astype(np.float32)
    save_video(folder / f"{name}.mp4", video, fps=16)
    if caption is not None:
        (folder / f"{name}.txt").write_text(caption)


@pytest.mark.slow
def test_videos_folder_is_encoded_and_bad_clips_are_reported(tmp_path):
    from tests.infer.test_infer_ckpt_dir import write_model_dir

    model_dir = tmp_path / "model"
    write_model_dir(model_dir, "original")
    clips = tmp_path / "clips"
    clips.mkdir()
    _clip(clips, "good", 9, "a red square moves left\n")
    _clip(clips, "uncaptioned", 9, None)
    _clip(clips, "short", 3, "too short to use")
    out = tmp_path / "records"
    result = _prepare(
        f"--videos_dir={clips}",
        f"--out_dir={out}",
        f"--ckpt_dir={model_dir}",
        "--size=32*32",
        "--frame_num=5",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped 2 of 3 clips:" in result.stdout
    assert f"{clips / 'uncaptioned.mp4'}: no caption file uncaptioned.txt beside it" in (
        result.stdout
    )
    assert f"{clips / 'short.mp4'}: too short: has 3 frames at 16 fps, needs 5" in result.stdout
    records = Records(out)
    assert len(records) == 1 and records.latent_shape == (2, 4, 4, 16)
    example = records[0]
    assert example.caption == "a red square moves left"
    assert example.text.shape[1] == 16 and 1 <= example.text.shape[0] <= 32
    assert np.isfinite(example.latent.astype(np.float32)).all()
    assert example.latent.astype(np.float32).std() > 0
    meta = records.index["metadata"]
    assert meta["encoder"]["encoder"] == "wan2.1"
    assert [s["reason"] for s in meta["skipped"]][0].startswith("no caption file")


@pytest.mark.parametrize(
    "flags,message",
    [
        ([], "give exactly one of --videos_dir and --synthetic"),
        (["--videos_dir=x"], "--ckpt_dir is required with --videos_dir"),
        (["--synthetic=2", "--size=60*32"], "multiples of 16"),
        (["--synthetic=2", "--frame_num=4"], "frame count must be 4k+1"),
        (["--synthetic=2", "--shard_size=0"], "--shard_size must be >= 1"),
        (["--videos_dir=/does/not/exist", "--ckpt_dir=m"], "videos directory not found"),
        (["--synthetic=2", "--ckpt_dir=/does/not/exist"], "model directory not found"),
    ],
)
def test_bad_flags_are_refused_with_the_reason(tmp_path, flags, message):
    result = _prepare(f"--out_dir={tmp_path / 'out'}", *flags, cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "out" / "index.json").exists()


def test_a_folder_without_usable_clips_fails_naming_each_clip(tmp_path):
    _clip(tmp_path, "lonely", 5, None)
    _clip(tmp_path, "blank", 5, "   ")
    result = _prepare(
        f"--videos_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}", "--ckpt_dir=m", cwd=tmp_path
    )
    assert result.returncode != 0
    assert "skipped 2 of 2 clips:" in result.stdout
    assert "lonely.mp4: no caption file lonely.txt beside it" in result.stdout
    assert "blank.mp4: caption file blank.txt is empty" in result.stdout
    assert f"no usable clips in {tmp_path}" in result.stderr


def test_an_existing_dataset_is_not_overwritten_by_default(tmp_path):
    flags = (
        "--synthetic=2",
        f"--out_dir={tmp_path}",
        "--size=32*32",
        "--frame_num=1",
        "--standin_text_dim=4",
    )
    assert _prepare(*flags, cwd=tmp_path).returncode == 0
    result = _prepare(*flags, cwd=tmp_path)
    assert result.returncode != 0
    assert f"--out_dir {tmp_path} holds a dataset (index.json); pass --overwrite" in result.stderr
    assert _prepare(*flags, "--overwrite", cwd=tmp_path).returncode == 0


def test_read_clip_scales_to_cover_and_crops_the_centre(tmp_path):
    from fpsa_jax.data import ClipTooShortError, read_clip

    video = np.full((5, 32, 64, 3), -1.0, np.float32)
    video[:, :, :16, 0] = 1.0  # red left quarter, green centre half, blue right quarter
    video[:, :, 16:48, 1] = 1.0
    video[:, :, 48:, 2] = 1.0
    save_video(tmp_path / "v.mp4", video, fps=16)
    got = read_clip(tmp_path / "v.mp4", width=16, height=16, frames=5, fps=16)
    assert got.shape == (5, 16, 16, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got[..., 2:-2, :].mean(axis=(0, 1, 2)), [-1, 1, -1], atol=0.1)
    with pytest.raises(ClipTooShortError, match="has 5 frames at 16 fps, needs 9"):
        read_clip(tmp_path / "v.mp4", width=16, height=16, frames=9, fps=16)


def test_an_unwritable_out_dir_is_refused_before_anything_is_encoded(tmp_path):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "records"
    result = _prepare("--synthetic=2", f"--out_dir={out}", "--frame_num=5", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --out_dir {out}: {tmp_path / 'file'} is a file, not a directory"
    )
    assert "STAND-IN encoding" not in result.stdout


def test_flags_and_an_existing_dataset_are_refused_before_the_encoders_load(tmp_path):
    """Before: an existing dataset was found by RecordWriter after the VAE and UMT5 had loaded,
    its message said "pass overwrite" (the flag is --overwrite); --fps nan was taken (nan < 0 is
    false); a bad --size named no flag."""
    out = tmp_path / "data"
    out.mkdir()
    (out / "index.json").write_text("{}")
    base = ["--synthetic=2", f"--out_dir={out}", "--size=32*32", "--frame_num=1", "--ckpt_dir=m"]
    assert outcomes(
        "train.prepare",
        [base, [*base, "--fps=nan"], [*base, "--size=60*32"], [*base, "--overwrite"]],
        work=["train.prepare._encoder"],
        cwd=tmp_path,
    ) == [
        f"error: --out_dir {out} holds a dataset (index.json); pass --overwrite to replace it",
        "error: --fps must be a finite number >= 0, got nan",
        "error: --size=60*32 --frame_num=1: video size 60*32 (width*height): both must be "
        "positive multiples of 16 (VAE stride 8 x DiT patch 2)",
        "work: train.prepare._encoder",
    ]
