"""The JSON round trip that every frozen config dataclass shares (WanConfig, UMT5Config,
WanVAEConfig, TrainConfig): to_dict / from_dict / to_json / from_json.

(`fpsa_jax.attention` keeps its own for FPSAConfig and StepSchedule: the operator package imports
nothing else from fpsa_jax.)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, Self


class JsonConfig:
    """Mixin of a frozen dataclass whose fields are JSON values, tuples (written as lists, which
    the class's __post_init__ turns back) or objects with a `to_dict` (written nested).

    from_dict takes to_dict's output: missing keys take the field defaults, unknown keys raise a
    ValueError naming the class and its fields. A class with nested objects rebuilds them in
    `_from_json_fields`; the constructor then validates as for any other caller.
    """

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict; `from_dict` inverts it."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; valid: {sorted(known)}")
        return cls(**cls._from_json_fields(dict(d)))

    @classmethod
    def _from_json_fields(cls, fields: dict[str, Any]) -> dict[str, Any]:
        """Turns nested dicts of `fields` back into the objects the constructor takes."""
        return fields

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Self:
        return cls.from_dict(json.loads(text))


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return value
