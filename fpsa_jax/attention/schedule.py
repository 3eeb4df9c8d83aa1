"""`StepSchedule`: which FPSA operator each denoising step uses.

Step i of N (i = 0 first, noisiest) uses the first phase with i / N < end_fraction. Which step a
training noise level stands for is the sampling schedule's business
(`fpsa_jax.sampling.FlowSchedule.nearest_step`); this module knows steps only.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from fpsa_jax.attention.config import FPSAConfig
from fpsa_jax.attention.tiling import window_for_density


@dataclasses.dataclass(frozen=True)
class Phase:
    """Steps with i / N < end_fraction (and past the previous phase) use `config` (None = dense)."""

    end_fraction: float
    config: FPSAConfig | None


def _phase_from_dict(i: int, p: Any) -> Phase:
    if not isinstance(p, Mapping) or set(p) != {"end_fraction", "config"}:
        got = f"keys {sorted(p)}" if isinstance(p, Mapping) else repr(p)
        raise ValueError(
            f"StepSchedule phases[{i}] must be an object with exactly the keys end_fraction and "
            f"config (null for dense), got {got}"
        )
    config = p["config"]
    if config is not None and not isinstance(config, Mapping):
        raise ValueError(
            f"StepSchedule phases[{i}].config must be an FPSAConfig object or null, got {config!r}"
        )
    try:
        return Phase(p["end_fraction"], None if config is None else FPSAConfig.from_dict(config))
    except ValueError as e:
        raise ValueError(f"StepSchedule phases[{i}].config: {e}") from None


def _as_phase(p: Any) -> Phase:
    if isinstance(p, Phase):
        return p
    if isinstance(p, Sequence) and len(p) == 2:
        return Phase(p[0], p[1])
    raise ValueError(f"StepSchedule.phases entries must be (end_fraction, config), got {p!r}")


@dataclasses.dataclass(frozen=True)
class StepSchedule:
    """An ordered tuple of `Phase`s; end fractions strictly increase and the last is 1.0."""

    phases: tuple[Phase, ...]

    def __post_init__(self):
        if isinstance(self.phases, (str, bytes)) or not isinstance(self.phases, Sequence):
            raise ValueError(
                f"StepSchedule.phases must be a sequence of phases, got {self.phases!r}"
            )
        phases = tuple(_as_phase(p) for p in self.phases)
        if not phases:
            raise ValueError("StepSchedule.phases must not be empty")
        prev = 0.0
        for i, p in enumerate(phases):
            e = p.end_fraction
            if isinstance(e, bool) or not isinstance(e, numbers.Real):
                raise ValueError(
                    f"StepSchedule.phases[{i}].end_fraction must be a number, got {e!r}"
                )
            if not prev < e <= 1.0:
                raise ValueError(
                    f"StepSchedule.phases[{i}].end_fraction must be in ({prev}, 1.0] (strictly "
                    f"increasing), got {e}"
                )
            if p.config is not None and not isinstance(p.config, FPSAConfig):
                raise ValueError(
                    f"StepSchedule.phases[{i}].config must be an FPSAConfig or None, "
                    f"got {type(p.config).__name__}"
                )
            prev = e
        if phases[-1].end_fraction != 1.0:
            raise ValueError(
                f"StepSchedule.phases[-1].end_fraction must be 1.0, got {phases[-1].end_fraction}"
            )
        object.__setattr__(
            self, "phases", tuple(Phase(float(p.end_fraction), p.config) for p in phases)
        )

    @property
    def configs(self) -> tuple[FPSAConfig | None, ...]:
        return tuple(p.config for p in self.phases)

    def phase_index(self, step, num_steps: int):
        """Index of the phase of `step` (an int, or an int array; works under jit)."""
        # Steps [0, ends[p]) belong to phases <= p. The counts are taken on the host in float64,
        # i / N < end literally, so traced lookups reduce to integer compares (no float32 i / N).
        steps = np.arange(num_steps) / max(num_steps, 1)
        ends = np.array([(steps < p.end_fraction).sum() for p in self.phases[:-1]], np.int32)
        if isinstance(step, numbers.Integral):
            _check_step(int(step), num_steps)
            return int((step >= ends).sum())
        step = jnp.asarray(step)
        return (step[..., None] >= jnp.asarray(ends)).sum(axis=-1)

    def config_for_step(self, step: int, num_steps: int) -> FPSAConfig | None:
        """The operator of denoising step `step` in [0, num_steps) (0 = noisiest)."""
        return self.phases[self.phase_index(int(step), num_steps)].config

    def to_dict(self) -> dict[str, Any]:
        return {
            "phases": [
                {
                    "end_fraction": p.end_fraction,
                    "config": None if p.config is None else p.config.to_dict(),
                }
                for p in self.phases
            ]
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StepSchedule:
        """Inverts `to_dict`: {"phases": [{"end_fraction": e, "config": FPSAConfig dict or
        None}, ...]}. Raises ValueError naming the first entry of another structure."""
        shape = '{"phases": [{"end_fraction": ..., "config": ...}, ...]}'
        if not isinstance(d, Mapping):
            raise ValueError(f"a StepSchedule is {shape}, got a {type(d).__name__}")
        if set(d) != {"phases"}:
            raise ValueError(
                f"StepSchedule dict must have exactly the key 'phases' ({shape}), got keys "
                f"{sorted(d)}"
            )
        entries = d["phases"]
        if isinstance(entries, (str, bytes, Mapping)) or not isinstance(entries, Sequence):
            raise ValueError(f"StepSchedule 'phases' must be a list, got {entries!r}")
        return cls(tuple(_phase_from_dict(i, p) for i, p in enumerate(entries)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> StepSchedule:
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, spec: str | os.PathLike) -> StepSchedule:
        """A preset name (see `preset`) or, for a path ending in .json, the file `to_json` wrote.

        Raises FileNotFoundError for a missing file, ValueError for an unknown preset or a file
        that is not a schedule.
        """
        spec = os.fspath(spec)
        if not spec.endswith(".json"):
            return cls.preset(spec)
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"StepSchedule file not found: {spec}")
        try:
            return cls.from_json(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"not a StepSchedule JSON file ({e})") from None

    @classmethod
    def preset(cls, name: str) -> StepSchedule:
        """A named schedule: "wan-480p", "wan-720p", "demo" (see `_demo_schedule`) or "dense".

        The Wan presets follow the paper's three-phase shape: early (noisiest) steps use coarse
        quantization groups and a sparse window, middle steps the finest groups (one scale per
        tile) and the densest window, late steps intermediate groups and window. The paper
        publishes no split points or per-phase values, and these were not measured on real Wan
        weights (none were available here): the split points (25% / 75% of the steps), the groups
        and each phase's density target are a stated choice, and each window is the one nearest
        its phase's target on the resolution's token grid (`tiling.window_for_density`, pure
        arithmetic). A user with weights measures instead: `python -m train.calibrate --ckpt_dir
        ...` writes a schedule chosen from per-step errors on their model, which `load` reads
        (`--phase_densities` there derives windows from other targets the same way).

        Tile (3, 8, 8) = 192 tokens (a multiple of 64) for both resolutions: on the 480p token grid
        (21, 30, 52) the tile grid is (7, 4, 7) = 196 tiles (87% of slots hold tokens); on the 720p
        grid (21, 45, 80) it is (7, 6, 10) = 420 tiles (94%).

        Density targets (early, middle, late) -> windows (window tiles / all tiles):
          wan-480p: 0.23, 0.51, 0.31 -> (3, 3, 5) 45/196, (5, 4, 5) 100/196, (4, 3, 5) 60/196.
          wan-720p: 0.11, 0.33, 0.14 -> (3, 3, 5) 45/420, (5, 4, 7) 140/420, (4, 3, 5) 60/420.
        Groups (q_group = k_group): early (2, 2, 2), middle (1, 1, 1), late (1, 2, 2).
        """
        if name == "dense":
            return cls((Phase(1.0, None),))
        if name == "demo":
            return _demo_schedule()
        if name not in _WAN_PRESETS:
            valid = ", ".join(("dense", "demo", *_WAN_PRESETS))
            raise ValueError(f"unknown StepSchedule preset {name!r}; valid: {valid}")
        grid, densities = _WAN_PRESETS[name]
        groups = ((2, 2, 2), (1, 1, 1), (1, 2, 2))
        return cls.from_densities((3, 8, 8), grid, (0.25, 0.75, 1.0), densities, groups)

    @classmethod
    def from_densities(cls, tile, grid, ends, densities, groups) -> StepSchedule:
        """FP8 phases ending at `ends` (fractions of the steps), each with the window nearest its
        density target on the token `grid` (`tiling.window_for_density`) and q_group = k_group
        from `groups`: how the Wan presets and `train.calibrate --phase_densities` are built."""
        return cls(
            tuple(
                Phase(
                    e,
                    FPSAConfig(
                        tile=tile,
                        window=window_for_density(tile, grid, d),
                        quant="fp8",
                        q_group=g,
                        k_group=g,
                    ),
                )
                for e, d, g in zip(ends, densities, groups, strict=True)
            )
        )


# Wan presets: (token grid of 81 frames at the resolution, per-phase density targets: a choice).
_WAN_PRESETS = {
    "wan-480p": ((21, 30, 52), (0.23, 0.51, 0.31)),
    "wan-720p": ((21, 45, 80), (0.11, 0.33, 0.14)),
}


def _demo_schedule() -> StepSchedule:
    """The embedded demo model's schedule (fpsa_jax.demo): the Wan presets' three-phase shape
    scaled to its (9, 8, 8) token grid.

    Tile (3, 4, 4) = 48 tokens gives a (3, 2, 2) tile grid of 12 tiles, so windows can drop blocks
    on every axis. Densities: early (2, 1, 1) 2/12 = 17%, middle (2, 2, 2) 8/12 = 67%, late
    (2, 1, 2) 4/12 = 33%; over 20 steps (5 / 10 / 5) 46% of the blocks are computed. Groups as in
    the Wan presets: early (2, 2, 2), middle (1, 1, 1), late (1, 2, 2).
    """
    phases = (
        (0.25, (2, 1, 1), (2, 2, 2)),
        (0.75, (2, 2, 2), (1, 1, 1)),
        (1.0, (2, 1, 2), (1, 2, 2)),
    )
    return StepSchedule(
        tuple(
            Phase(e, FPSAConfig(tile=(3, 4, 4), window=w, quant="fp8", q_group=g, k_group=g))
            for e, w, g in phases
        )
    )


def _check_step(step: int, num_steps: int) -> None:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 <= step < num_steps:
        raise ValueError(f"step must be in [0, {num_steps}), got {step}")
