"""Where runs write: every output location checked before the expensive work, results written
aside under a name that says who writes them, and cleanup when the process is told to stop.

The apps (`python -m infer`, `python -m train`, `python -m fpsa_jax.convert`) call
`check_outputs` once, before any weights load: each `Output` must be creatable (its nearest
existing folder is a folder this process can write in; tried by writing, so read-only mounts and
root count) and the outputs on one filesystem must fit in its free space where their size is
known; an output that exists is refused unless the run may replace it (`Output.replace`, the
apps' --overwrite). Results are written as a hidden sibling (`sibling_temp`, `atomic_file`) and
renamed into place, so a destination is either absent, the old one, or complete; the sibling is
given the permissions a new file or folder gets under the process's umask (mkstemp's 0600 and
mkdtemp's 0700 would otherwise become the result's). The sibling's name carries
this host and process id: `remove_stale_temps` deletes the siblings of a destination whose
process is gone (a killed earlier run), never one of a live process or another host.
`stop_on_signals` turns SIGTERM (and SIGHUP) into `SystemExit`, as SIGINT already raises
KeyboardInterrupt, so those cleanups run when a run is stopped.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path


class OutputError(ValueError):
    """An output location that cannot take what the run would write there; one line."""


@dataclasses.dataclass(frozen=True)
class Output:
    """One place a run writes.

    what: how the user names it (a flag such as "--save_file"), first in every message.
    path: the file or directory written.
    is_dir: a directory (the run writes inside it) rather than a file.
    aside: the directory is written as a sibling and renamed into place, so it is the parent
      that must take new entries (a converted checkpoint), not the directory itself.
    size: bytes it will take, when known; outputs on one filesystem must fit in its free space
      together.
    replace: whether an existing file (or non-empty directory) may be replaced; False refuses
      it with "pass --overwrite to replace it".
    """

    what: str
    path: Path
    is_dir: bool = False
    aside: bool = False
    size: int | None = None
    replace: bool = True


def check_outputs(outputs: Sequence[Output]) -> None:
    """Raises OutputError naming the first output that cannot be written, or the outputs that
    do not fit in their filesystem's free space. Creates nothing that stays."""
    need: dict[int, list[tuple[Output, Path]]] = collections.defaultdict(list)
    for out in outputs:
        folder = _writable_folder(out)
        need[os.stat(folder).st_dev].append((out, folder))
    for group in need.values():
        total = sum(out.size or 0 for out, _ in group)
        if not total:
            continue
        folder = group[0][1]
        free = shutil.disk_usage(folder).free
        if total > free:
            names = [out.what for out, _ in group if out.size]
            verb = "needs" if len(names) == 1 else "need"
            raise OutputError(
                f"{' and '.join(names)} {verb} {_size(total)} but the filesystem of {folder} "
                f"has {_size(free)} free"
            )


def _writable_folder(out: Output) -> Path:
    path = Path(out.path).expanduser().absolute()
    if path.is_dir() and not out.is_dir:
        raise OutputError(f"{out.what} {path} is a directory, not a file")
    if path.exists() and out.is_dir and not path.is_dir():
        raise OutputError(f"{out.what} {path} exists and is not a directory")
    if not out.replace and (path.is_file() or (path.is_dir() and any(path.iterdir()))):
        raise OutputError(f"{out.what} {path} exists; pass --overwrite to replace it")
    folder = path if out.is_dir and path.is_dir() and not out.aside else path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"{out.what} {path}: {folder} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".fpsa-write-check-", dir=folder)
    except OSError as e:
        raise OutputError(f"{out.what} {path}: cannot write in {folder} ({e.strerror})") from None
    os.close(fd)
    os.unlink(probe)
    return folder


def _size(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:,.1f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n} bytes"


# -- siblings written aside ----------------------------------------------------------------------

_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _prefix(dst: Path, tag: str) -> str:
    return f".{dst.name}.{tag}-"


def sibling_temp(dst: str | Path, *, is_dir: bool = False, tag: str = "tmp") -> Path:
    """Creates a new hidden file or directory beside `dst`, named after it, this host and this
    process (`.NAME.TAG-HOST-PID-RANDOM`, a file keeping `dst`'s suffix, which ffmpeg and PIL
    read the format from). The caller renames it onto `dst` or removes it."""
    dst = Path(dst).expanduser().absolute()
    dst.parent.mkdir(parents=True, exist_ok=True)
    prefix = f"{_prefix(dst, tag)}{_HOST}-{os.getpid()}-"
    umask = _umask()
    if is_dir:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=dst.parent))
        os.chmod(path, 0o777 & ~umask)
        return path
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=dst.suffix, dir=dst.parent)
    os.fchmod(fd, 0o666 & ~umask)
    os.close(fd)
    return Path(name)


def _umask() -> int:
    """The process's umask (read by setting it and back: POSIX has no getter)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def stale_temps(dst: str | Path, tag: str = "tmp") -> list[Path]:
    """The siblings `sibling_temp(dst, tag=tag)` made for processes of this host that are no
    longer running."""
    dst = Path(dst).expanduser().absolute()
    if not dst.parent.is_dir():
        return []
    pattern = re.compile(re.escape(_prefix(dst, tag)) + r"([0-9a-f]{8})-(\d+)-")
    found = []
    for path in sorted(dst.parent.iterdir()):
        m = pattern.match(path.name)
        if m and m[1] == _HOST and int(m[2]) != os.getpid() and not _running(int(m[2])):
            found.append(path)
    return found


def remove_stale_temps(dst: str | Path, tag: str = "tmp") -> list[Path]:
    """Deletes `stale_temps(dst, tag)`; returns what it deleted."""
    removed = stale_temps(dst, tag)
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


@contextlib.contextmanager
def atomic_file(dst: str | Path) -> Iterator[Path]:
    """Yields a sibling temp path to write; renames it onto `dst` when the block succeeds and
    removes it when it raises (a signal under `stop_on_signals` included)."""
    dst = Path(dst).expanduser().absolute()
    remove_stale_temps(dst)
    tmp = sibling_temp(dst)
    try:
        yield tmp
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# -- signals -------------------------------------------------------------------------------------

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP print one line and raise SystemExit(128 + signal)
    in the main thread, so `finally` and `except BaseException` cleanups run as they do for
    Ctrl-C. Outside the main thread (where handlers cannot be set) it does nothing."""

    def stop(signum, frame):
        print(f"stopped by {signal.Signals(signum).name}; cleaning up", file=sys.stderr)
        raise SystemExit(128 + signum)

    try:
        previous = {s: signal.signal(s, stop) for s in _STOP_SIGNALS}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
