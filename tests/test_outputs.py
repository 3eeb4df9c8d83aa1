"""fpsa_jax.outputs: output locations checked before work, siblings written aside and their
stale ones removed, SIGTERM turned into a cleanup."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fpsa_jax import outputs
from fpsa_jax.outputs import (
    Output,
    OutputError,
    atomic_file,
    check_outputs,
    remove_stale_temps,
    sibling_temp,
    stale_temps,
    stop_on_signals,
)


def test_new_nested_outputs_in_a_writable_folder_pass_and_nothing_is_left(tmp_path):
    check_outputs(
        [
            Output("--save_file", tmp_path / "a" / "b" / "v.mp4"),
            Output("--workdir", tmp_path / "run", is_dir=True, size=10),
            Output("--dst", tmp_path / "ckpt", is_dir=True, aside=True),
        ]
    )
    assert list(tmp_path.iterdir()) == []


def test_an_output_below_a_file_is_refused(tmp_path):
    (tmp_path / "notes").write_text("x")
    with pytest.raises(OutputError, match=r"^--save_file .*notes is a file, not a directory$"):
        check_outputs([Output("--save_file", tmp_path / "notes" / "sub" / "v.mp4")])


def test_a_file_output_that_is_a_directory_is_refused(tmp_path):
    with pytest.raises(OutputError, match="is a directory, not a file"):
        check_outputs([Output("--save_latents", tmp_path)])


def test_a_directory_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "run").write_text("x")
    with pytest.raises(OutputError, match="--workdir .*run exists and is not a directory"):
        check_outputs([Output("--workdir", tmp_path / "run", is_dir=True)])


def test_a_folder_that_refuses_writes_is_named_with_the_reason(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OutputError, match=rf"cannot write in {tmp_path} \(Read-only file system\)"):
        check_outputs([Output("--dst", tmp_path / "ckpt", is_dir=True, aside=True)])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in read-only folders")
def test_a_read_only_folder_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o555)
    with pytest.raises(OutputError, match="cannot write in .*Permission denied"):
        check_outputs([Output("--save_file", folder / "v.mp4")])


def test_an_existing_directory_is_checked_inside_unless_written_aside(tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    seen = []
    real = tempfile.mkstemp
    monkeypatch.setattr(
        tempfile, "mkstemp", lambda **kw: seen.append(Path(kw["dir"])) or real(**kw)
    )
    check_outputs([Output("--workdir", tmp_path / "run", is_dir=True)])
    check_outputs([Output("--dst", tmp_path / "run", is_dir=True, aside=True)])
    assert seen == [tmp_path / "run", tmp_path]


def test_outputs_on_one_filesystem_must_fit_its_free_space_together(tmp_path, monkeypatch):
    usage = type("Usage", (), {"free": 100})
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: usage)
    video, latents = (
        Output("--save_file", tmp_path / "v.mp4", size=60),
        Output("--save_latents", tmp_path / "z.npy", size=60),
    )
    check_outputs([video])
    with pytest.raises(OutputError, match="^--save_file and --save_latents need 120 bytes but"):
        check_outputs([video, latents])
    with pytest.raises(OutputError, match=rf"needs 101 bytes .* of {tmp_path} has 100 bytes free$"):
        check_outputs([Output("--dst", tmp_path / "c", is_dir=True, aside=True, size=101)])


def test_an_output_larger_than_any_disk_is_refused(tmp_path):
    with pytest.raises(OutputError, match=r"^--dst needs 1,000,000,000.0 GB but the filesystem"):
        check_outputs([Output("--dst", tmp_path / "c", is_dir=True, aside=True, size=10**18)])


def _dead_pid() -> int:
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(child.stdout)


def _temp_of(pid: int, dst: Path, is_dir: bool, monkeypatch) -> Path:
    with monkeypatch.context() as m:
        m.setattr(os, "getpid", lambda: pid)
        return sibling_temp(dst, is_dir=is_dir)


def test_siblings_of_dead_processes_are_stale_and_removed_others_are_kept(tmp_path, monkeypatch):
    dst = tmp_path / "ckpt"
    dead_dir = _temp_of(_dead_pid(), dst, True, monkeypatch)
    (dead_dir / "params").mkdir()
    dead_file = _temp_of(_dead_pid(), tmp_path / "ckpt", False, monkeypatch)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live_dir = _temp_of(live.pid, dst, True, monkeypatch)
        mine = sibling_temp(dst, is_dir=True)
        other_host = tmp_path / f".ckpt.tmp-00000000-{_dead_pid()}-abcdefgh"
        other_host.mkdir()
        other_dst = sibling_temp(tmp_path / "ckpt2", is_dir=True)
        assert stale_temps(dst) == sorted([dead_dir, dead_file])
        assert sorted(remove_stale_temps(dst)) == sorted([dead_dir, dead_file])
        left = {p.name for p in tmp_path.iterdir()}
        assert left == {live_dir.name, mine.name, other_host.name, other_dst.name}
    finally:
        live.kill()
        live.wait()


def test_a_sibling_file_keeps_the_suffix_and_is_hidden(tmp_path):
    tmp = sibling_temp(tmp_path / "out" / "video.mp4")
    assert tmp.parent == tmp_path / "out" and tmp.name.startswith(".video.mp4.tmp-")
    assert tmp.suffix == ".mp4"


def test_atomic_file_renames_on_success_and_removes_on_failure(tmp_path):
    dst = tmp_path / "z.npy"
    with atomic_file(dst) as tmp:
        tmp.write_text("done")
    assert dst.read_text() == "done"
    with pytest.raises(RuntimeError), atomic_file(dst) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert dst.read_text() == "done" and [p.name for p in tmp_path.iterdir()] == ["z.npy"]


def test_sigterm_inside_stop_on_signals_runs_the_cleanups(tmp_path, capfd):
    before = signal.getsignal(signal.SIGTERM)
    dst = tmp_path / "v.mp4"
    with pytest.raises(SystemExit) as stopped, stop_on_signals(), atomic_file(dst) as tmp:
        tmp.write_text("half")
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs at the next bytecode boundary
            pass
    assert stopped.value.code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM; cleaning up" in capfd.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.fixture()
def umask():
    """Sets the process umask for a test, restores it after."""
    before = os.umask(0o022)
    os.umask(before)
    yield lambda mask: os.umask(mask)
    os.umask(before)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_results_get_the_permissions_of_new_files_under_the_umask(tmp_path, umask, mask):
    """Before: a result was its mkstemp/mkdtemp temp renamed into place, 0600 or 0700 whatever
    the umask (others, and the group, could not read a video or a converted checkpoint)."""
    umask(mask)
    with atomic_file(tmp_path / "v.mp4") as tmp:
        tmp.write_bytes(b"video")
    assert (tmp_path / "v.mp4").stat().st_mode & 0o777 == 0o666 & ~mask
    folder = sibling_temp(tmp_path / "ckpt", is_dir=True)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~mask


def test_an_existing_output_is_refused_unless_it_may_be_replaced(tmp_path):
    (tmp_path / "v.mp4").write_bytes(b"x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a").write_text("x")
    (tmp_path / "empty").mkdir()
    check_outputs([Output("--save_file", tmp_path / "v.mp4")])  # replace=True by default
    with pytest.raises(OutputError, match=r"^--save_file .*v.mp4 exists; pass --overwrite to"):
        check_outputs([Output("--save_file", tmp_path / "v.mp4", replace=False)])
    with pytest.raises(OutputError, match=r"^--out .*full exists; pass --overwrite"):
        check_outputs([Output("--out", tmp_path / "full", is_dir=True, replace=False)])
    check_outputs([Output("--out", tmp_path / "empty", is_dir=True, replace=False)])
