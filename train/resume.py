"""Resuming a run from its workdir: the newest checkpoint that restores, checked first.

- The model config saved with a checkpoint is compared with the run's before its state is
  restored: another model is one clear line, not an orbax shape traceback. Fields that change how
  the model computes but not its parameters (`COMPUTE_FIELDS`, e.g. --remat) do not count.
- A TrainConfig that differs from the checkpoint's is a warning naming the fields: the run goes
  on with its own.
- A checkpoint that does not restore (truncated, zeroed or missing files) is skipped with its
  step and the reason, and moved to WORKDIR/skipped_checkpoints/ (kept for inspection; the run
  will save that step number again); the next older one is tried. When none restores the run
  stops with one line naming each step and why: it never starts again from scratch silently.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from fpsa_jax.config import WanConfig
from train.checkpoints import Checkpoints

# WanConfig fields that are compute choices, not a different model.
COMPUTE_FIELDS = frozenset({"remat", "dtype"})
SKIPPED_DIR = "skipped_checkpoints"


class ResumeError(ValueError):
    """A workdir whose checkpoints this run cannot resume from; one line."""


@dataclasses.dataclass(frozen=True)
class Resumed:
    """Where the run starts: the step (0 = fresh), the state and the loader position."""

    step: int
    state: Any
    data: dict | None


def differences(saved: dict, current: dict, ignore=frozenset()) -> list[str]:
    """'name (saved there, current here)' for every field that differs."""

    def short(v):
        text = repr(v)
        return text if len(text) <= 40 else text[:37] + "..."

    keys = sorted((saved.keys() | current.keys()) - ignore)
    return [
        f"{k} ({short(saved.get(k))} there, {short(current.get(k))} here)"
        for k in keys
        if saved.get(k) != current.get(k)
    ]


def _with_defaults(model: dict) -> dict:
    """A saved model config with the WanConfig fields it predates at their defaults: a
    checkpoint written before `linear_quant` existed was trained with "none"."""
    defaults = {
        f.name: f.default
        for f in dataclasses.fields(WanConfig)
        if f.default is not dataclasses.MISSING
    }
    return {**defaults, **model}


def _differ(saved_model: dict, meta: dict, field: str) -> bool:
    return _with_defaults(saved_model).get(field) != meta["model_config"].get(field)


def _reason(error: BaseException) -> str:
    lines = str(error).strip().splitlines() or [""]
    text = f"{type(error).__name__}: {lines[0]}"
    return text if len(text) <= 160 else text[:157] + "..."


def resume(checkpoints: Checkpoints, template, meta: dict, workdir: Path) -> Resumed:
    """The newest checkpoint of `checkpoints` that restores onto `template`, after its model
    config is checked against meta["model_config"]; Resumed(0, template, None) when there is
    none. Prints what it skipped and why. Raises ResumeError (another model, or none restores)."""
    failed: list[tuple[int, str]] = []
    for step in sorted(checkpoints.all_steps(), reverse=True):
        try:
            saved = checkpoints.restore_meta(step)
            model = saved["model_config"]
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            failed.append((step, _reason(e)))
            continue
        changed = differences(_with_defaults(model), meta["model_config"], COMPUTE_FIELDS)
        if changed:
            quant = _differ(model, meta, "linear_quant")
            flag = "--model and --linear_quant" if quant else "--model"
            raise ResumeError(
                f"{workdir} holds checkpoints of another model (step {step} differs in "
                f"{', '.join(changed)}): pass the {flag} it was trained with, or use a new "
                "--workdir"
            )
        try:
            state, data, _ = checkpoints.restore(step, template)
        except Exception as e:
            failed.append((step, _reason(e)))
            continue
        _warn_train_config(saved.get("train_config", {}), meta["train_config"], step)
        _set_aside(checkpoints, failed, workdir)
        print(f"resuming from step {step} in {workdir}")
        return Resumed(step, state, data)
    if failed:
        listed = "; ".join(f"step {s}: {why}" for s, why in failed)
        raise ResumeError(f"no checkpoint in {workdir / 'checkpoints'} restores ({listed})")
    return Resumed(0, template, None)


def _warn_train_config(saved: dict, current: dict, step: int) -> None:
    changed = differences(saved, current)
    if changed:
        print(
            f"warning: this run's TrainConfig differs from step {step}'s in {', '.join(changed)}; "
            "going on with this run's",
            file=sys.stderr,
        )


def _set_aside(checkpoints: Checkpoints, failed: list[tuple[int, str]], workdir: Path) -> None:
    """Moves the checkpoints that did not restore out of orbax's directory."""
    if not failed:
        return
    target = workdir / SKIPPED_DIR
    target.mkdir(exist_ok=True)
    for step, why in failed:
        dst = target / str(step)
        n = 1
        while dst.exists():
            dst, n = target / f"{step}.{n}", n + 1
        os.replace(checkpoints.step_dir(step), dst)
        print(f"skipped checkpoint step {step} ({why}); moved it to {dst}", file=sys.stderr)
    checkpoints.reload()
