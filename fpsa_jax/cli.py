"""The command line every app shares (`python -m infer`, `python -m train`, `train.prepare`,
`train.export_demo`, `python -m fpsa_jax.convert`): flags checked before any work starts, each
error one line naming the flag and what it takes, and the short usage rather than the help of
every flag.

- `check_range(flag, Range(...))` declares the values a numeric flag takes, beside its
  definition; `check_flags()` (run by `run` after the flags parse, before `main`) raises
  app.UsageError for the first flag outside its range: "--sample_shift must be a finite number
  > 0, got nan". A flag whose default is None ("the model's own") may stay None.
- `run(main)` is `absl.app.run(main)`, except that a flag absl cannot parse, a flag outside its
  range or an `app.UsageError` from `main` (checks across flags, files, devices) prints two
  lines to stderr and exits with status 1:

      usage: python -m infer [--flag=value ...]; python -m infer --help lists the flags
      error: --sample_shift must be a finite number > 0, got nan

  (absl's own run prints the module docstring and every flag's help: 65 lines for infer.)
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable

from absl import app, flags

from fpsa_jax.ranges import Range


@dataclasses.dataclass(frozen=True)
class _RangeCheck:
    flag: flags.FlagHolder
    allowed: Range
    note: str


_CHECKS: list[_RangeCheck] = []


def check_range(flag: flags.FlagHolder, allowed: Range, note: str = "") -> flags.FlagHolder:
    """Declares that `flag` takes values in `allowed` (or None); `note` is appended to the
    message (e.g. what a negative value means). Returns `flag`."""
    _CHECKS.append(_RangeCheck(flag, allowed, note))
    return flag


def check_flags() -> None:
    """Raises app.UsageError naming the first flag declared by `check_range` whose value lies
    outside its range: "--NAME must be RANGE[NOTE], got VALUE"."""
    for check in _CHECKS:
        value = check.flag.value
        if value is not None and value not in check.allowed:
            # absl already made an integer flag an int: its range is enough to say.
            what = check.allowed.bounds if check.allowed.integer else check.allowed.text
            raise app.UsageError(f"--{check.flag.name} must be {what}{check.note}, got {value}")


def run(main: Callable[[list[str]], object]) -> None:
    """`absl.app.run(main)` with `check_flags` before main, one-line errors and the short
    usage."""
    app.run(_usage_errors(main), flags_parser=_parse)


def program() -> str:
    """How the running app was started, e.g. "python -m infer"."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return f"python -m {spec.name.removesuffix('.__main__')}"
    return sys.argv[0] if sys.argv and sys.argv[0] else "python"


def error_line(error: BaseException) -> str:
    """The message of a flag or usage error, on one line."""
    return " ".join(str(error).split())


def _parse(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _usage_exit(e)


def _usage_errors(main):
    @functools.wraps(main)
    def checked(argv):
        try:
            check_flags()
            return main(argv)
        except app.UsageError as e:
            _usage_exit(e)

    return checked


def _usage_exit(error: BaseException):
    name = program()
    sys.stderr.write(
        f"usage: {name} [--flag=value ...]; {name} --help lists the flags\n"
        f"error: {error_line(error)}\n"
    )
    sys.exit(1)
