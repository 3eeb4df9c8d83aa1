"""`Range`: the interval a numeric setting must lie in, and the words every message uses for it.

One wording for configs (`TrainConfig`), library arguments and command-line flags
(`fpsa_jax.cli`): "must be a finite number > 0, got nan", "must be an int in [0, 2^63), got -3".
A value is in a real range only when it is finite (NaN and inf never are); bools are not numbers.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any


@dataclasses.dataclass(frozen=True)
class Range:
    """Values v with lo <= v <= hi (< or > where `lo_open` / `hi_open`); None = unbounded on that
    side. `integer`: only ints; otherwise any finite real number."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False

    def __contains__(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(
            value, numbers.Integral if self.integer else numbers.Real
        ):
            return False
        if not self.integer and not math.isfinite(value):
            return False
        if self.lo is not None and not (value > self.lo if self.lo_open else value >= self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    @property
    def bounds(self) -> str:
        """The bounds alone, e.g. "> 0", "in [0, 1)", "" when unbounded."""
        if self.lo is None and self.hi is None:
            return ""
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {_show(self.lo)}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {_show(self.hi)}"
        left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
        return f"in {left}{_show(self.lo)}, {_show(self.hi)}{right}"

    @property
    def text(self) -> str:
        """E.g. "a finite number > 0", "a finite number in [0, 1)", "an int >= 1"."""
        kind = "an int" if self.integer else "a finite number"
        return f"{kind} {self.bounds}".rstrip()

    def check(self, name: str, value: Any) -> Any:
        """`value` (an int as int, a real as float) when it lies in the range, else ValueError
        "{name} must be {text}, got {value!r}"."""
        if value not in self:
            raise ValueError(f"{name} must be {self.text}, got {value!r}")
        return int(value) if self.integer else float(value)


def _show(x: float) -> str:
    """A bound as people write it: 0 not 0.0, 2^63 not 9223372036854775808."""
    if isinstance(x, int) and x >= 2**16 and x & (x - 1) == 0:
        return f"2^{x.bit_length() - 1}"
    return f"{x:g}" if isinstance(x, float) else str(x)
