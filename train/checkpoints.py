"""Training checkpoints with orbax's CheckpointManager: state, data position and configs.

Each checkpoint step holds three items: `state` (the TrainState pytree: params, EMA, optimizer
state, step, RNG key data), `data` (the loader's JSON position) and `meta` (the model and train
configs as JSON). Saves are asynchronous; orbax writes each step into a temporary directory and
renames it when complete, so a process killed mid-save leaves the previous checkpoint intact and
the partial one invisible to `latest_step`.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from fpsa_jax.config import WanConfig
from fpsa_jax.outputs import Output, check_outputs
from fpsa_jax.training.state import TrainState

# Bytes per parameter of a saved TrainState: float32 params, EMA and Adam's two moments.
STATE_BYTES_PER_PARAM = 16


def check_workdir(workdir: Path, config: WanConfig | None = None) -> None:
    """Raises fpsa_jax.outputs.OutputError when `workdir` cannot take the run's files: it is not
    (or cannot become) a writable directory, or, with `config`, its filesystem has less room
    than one more checkpoint of the training state."""
    size = None if config is None else STATE_BYTES_PER_PARAM * config.num_params()
    check_outputs([Output("--workdir", workdir, is_dir=True, size=size)])


def saved_steps(workdir: Path) -> list[int]:
    """The steps of the complete checkpoints in `workdir` (a `python -m train` run directory),
    oldest first; [] when it has none. Creates nothing."""
    if not (Path(workdir) / "checkpoints").is_dir():
        return []
    checkpoints = Checkpoints(Path(workdir), keep=1_000_000)
    try:
        return sorted(checkpoints.all_steps())
    finally:
        checkpoints.close()


def _to_savable(state: TrainState) -> TrainState:
    # Typed PRNG keys are not array-serialisable; store their raw uint32 data.
    return state.replace(rng=jax.random.key_data(state.rng))


class Checkpoints:
    """Keep-last-N checkpoints of a run under WORKDIR/checkpoints."""

    def __init__(self, workdir: Path, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True)
        self._root = (workdir / "checkpoints").absolute()
        self._manager = ocp.CheckpointManager(
            self._root,
            options=options,
            item_names=("state", "data", "meta"),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints (orbax hides unfinished saves)."""
        return list(self._manager.all_steps())

    def step_dir(self, step: int) -> Path:
        return self._root / str(step)

    def reload(self) -> None:
        """Re-reads the step list after step directories were moved away."""
        self._manager.reload()

    def save(self, step: int, state: TrainState, data: dict, meta: dict) -> None:
        """Starts an asynchronous save of `step` (returns before the files are written)."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_to_savable(state)),
                data=ocp.args.JsonSave(data),
                meta=ocp.args.JsonSave(meta),
            ),
        )

    def restore(self, step: int, template: TrainState) -> tuple[TrainState, dict, dict]:
        """Restores `step` onto the shapes, dtypes and shardings of `template`."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            _to_savable(template),
        )
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        state = restored.state.replace(rng=jax.random.wrap_key_data(restored.state.rng))
        return state, restored.data, restored.meta

    def restore_meta(self, step: int) -> dict:
        """The model and train configs saved with `step` (no template needed)."""
        return self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        ).meta

    def close(self) -> None:
        """Waits for pending saves, then releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()
