"""The one error type of checkpoint conversion, and the helper that keeps its messages short."""

from __future__ import annotations

from collections.abc import Iterable

_MAX_LISTED = 10


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted: wrong files, keys, shapes or config values."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A path (checkpoint, shard, converted directory) that does not exist.

    Also a `FileNotFoundError`, so callers that catch the standard error keep working.
    """


def format_keys(keys: Iterable[str], limit: int = _MAX_LISTED) -> str:
    """`'a', 'b', ... and N more`: keys sorted naturally (blocks.2 before blocks.10)."""
    keys = sorted(keys, key=natural_key)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def natural_key(name: str) -> tuple:
    """Sort key that orders the integer parts of a dotted name numerically."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))
