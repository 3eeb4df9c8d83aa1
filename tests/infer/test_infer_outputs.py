"""`python -m infer` checks every output location before any weight loads, and a SIGTERM while
the mp4 is written leaves nothing behind (embedded demo model, runtime dependencies only)."""

from __future__ import annotations

import signal

from tests.runtime_env import run_module

STEPS = "--sample_steps=1"
STARTED = "No --ckpt_dir: the embedded demo model"  # the first line once the run is under way


def _last_line(result) -> str:
    return result.stderr.strip().splitlines()[-1]


def test_an_unwritable_save_file_stops_the_run_before_it_starts(tmp_path):
    """Before: infer denoised and decoded, then died with an OSError traceback."""
    (tmp_path / "file").write_text("x")
    video = tmp_path / "file" / "v.mp4"
    result = run_module("infer", STEPS, f"--save_file={video}", cwd=tmp_path)
    assert result.returncode == 1
    assert _last_line(result) == (
        f"error: --save_file {video}: {tmp_path / 'file'} is a file, not a directory"
    )
    assert STARTED not in result.stdout


def test_an_unwritable_save_latents_writes_no_video_either(tmp_path):
    """Before: with an unwritable --save_latents the mp4 was written and the run still failed."""
    (tmp_path / "busy.npy").mkdir()
    video, latents = tmp_path / "v.mp4", tmp_path / "busy.npy"
    result = run_module(
        "infer", STEPS, f"--save_file={video}", f"--save_latents={latents}", cwd=tmp_path
    )
    assert result.returncode == 1
    assert _last_line(result) == f"error: --save_latents {latents} is a directory, not a file"
    assert not video.exists() and STARTED not in result.stdout


# SIGTERM to the run itself once ffmpeg has taken two frames of the video.
_TERM_DURING_MP4 = """
import os, signal
import imageio_ffmpeg
write_frames = imageio_ffmpeg.write_frames
def terminated_write_frames(*args, **kwargs):
    writer = write_frames(*args, **kwargs)
    def frames():
        sent = 0
        frame = yield
        while True:
            writer.send(frame)
            sent += 1
            if sent == 3:  # the start, then two frames
                os.kill(os.getpid(), signal.SIGTERM)
            frame = yield
    gen = frames()
    next(gen)
    class Writer:
        send = gen.send
        def close(self):
            gen.close()
            writer.close()
    return Writer()
imageio_ffmpeg.write_frames = terminated_write_frames
"""


def test_sigterm_while_the_mp4_is_written_leaves_no_hidden_file(tmp_path):
    """Before: SIGTERM during the write left a hidden .v.*.mp4 beside the destination."""
    out = tmp_path / "out"
    result = run_module(
        "infer", STEPS, f"--save_file={out / 'v.mp4'}", cwd=tmp_path, patch=_TERM_DURING_MP4
    )
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-2000:]
    assert "stopped by SIGTERM; cleaning up" in result.stderr
    assert list(out.iterdir()) == []
