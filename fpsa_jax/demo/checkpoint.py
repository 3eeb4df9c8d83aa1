"""Demo checkpoints: one .safetensors file holding the DiT's parameters and, in its header, the
WanConfig, the FPSA step schedule it was trained for, its sampling settings and where it came from.

Why this format. The file loads with `safetensors` and NumPy alone (no orbax directory, no
network), is a single file that git and a wheel carry easily, and keeps its own description: a
checkpoint cannot be paired with the wrong config. Parameters are float32 (the demo model is
~2.4M parameters, ~10 MB); keys are the Flax tree's path joined with "/", e.g.
"blocks/self_attn/q/kernel" [num_layers, dim, dim].
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from fpsa_jax.attention.schedule import StepSchedule
from fpsa_jax.config import WanConfig

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "demo"
# The embedded default of `python -m infer`: the demo model after FPSA fine-tuning (QAT).
DEFAULT_CHECKPOINT = ASSETS / "fpsa-qat.safetensors"
# The same model before fine-tuning (dense training only): the baselines of benchmarks/quality.py.
DENSE_CHECKPOINT = ASSETS / "dense.safetensors"
_FORMAT = "fpsa-jax-demo/1"


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the demo model samples (its schedule's phases are fixed for `num_steps`)."""

    num_steps: int = 20
    shift: float = 3.0
    guide_scale: float = 4.0
    solver: str = "unipc"


@dataclasses.dataclass(frozen=True)
class DemoCheckpoint:
    """A demo model: config, float32 params (nested dicts of NumPy arrays), the schedule it was
    trained for (None: trained dense), its sampling settings and free-form provenance."""

    config: WanConfig
    params: Any
    schedule: StepSchedule | None
    sampling: Sampling
    info: dict[str, Any]


def flatten_params(params: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dicts -> {"a/b/c": float32 array}."""
    out: dict[str, np.ndarray] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_params(value, name + "/"))
        else:
            out[name] = np.ascontiguousarray(np.asarray(value, np.float32))
    return out


def unflatten_params(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    """{"a/b/c": array} -> nested dicts (inverse of `flatten_params`)."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def save_demo(path: str | Path, checkpoint: DemoCheckpoint) -> Path:
    """Writes `checkpoint` to `path` (.safetensors); returns the path."""
    from safetensors.numpy import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"demo checkpoints are .safetensors files, got {path}")
    metadata = {
        "format": _FORMAT,
        "wan_config": checkpoint.config.to_json(),
        "schedule": "null" if checkpoint.schedule is None else checkpoint.schedule.to_json(),
        "sampling": json.dumps(dataclasses.asdict(checkpoint.sampling)),
        "info": json.dumps(checkpoint.info, sort_keys=True),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(flatten_params(checkpoint.params), tmp, metadata=metadata)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when writing failed
    return path


def is_demo_checkpoint(path: str | Path) -> bool:
    """True when `path` is a .safetensors file written by `save_demo`."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        return (f.metadata() or {}).get("format") == _FORMAT


def read_demo_config(path: str | Path) -> WanConfig:
    """The WanConfig in the header of the demo checkpoint `path`, without its parameters."""
    from safetensors import safe_open

    if not is_demo_checkpoint(path):
        raise ValueError(f"{path} is not a demo checkpoint (no '{_FORMAT}' header)")
    with safe_open(path, framework="numpy") as f:
        return WanConfig.from_json(f.metadata()["wan_config"])


def load_demo(path: str | Path = DEFAULT_CHECKPOINT) -> DemoCheckpoint:
    """Reads a checkpoint written by `save_demo` (default: the embedded FPSA demo model).

    Raises FileNotFoundError for a missing file, ValueError for a file of another kind or whose
    parameters do not match its own WanConfig.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"demo checkpoint not found: {path}")
    if not is_demo_checkpoint(path):
        raise ValueError(f"{path} is not a demo checkpoint (no '{_FORMAT}' header)")
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata()
        flat = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no items)
    config = WanConfig.from_json(meta["wan_config"])
    schedule_json = json.loads(meta["schedule"])
    schedule = None if schedule_json is None else StepSchedule.from_dict(schedule_json)
    checkpoint = DemoCheckpoint(
        config=config,
        params=unflatten_params(flat),
        schedule=schedule,
        sampling=Sampling(**json.loads(meta["sampling"])),
        info=json.loads(meta["info"]),
    )
    _check_shapes(checkpoint, path)
    return checkpoint


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(k.key) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def _check_shapes(checkpoint: DemoCheckpoint, path: Path) -> None:
    import jax

    from fpsa_jax.model.wan import init_params

    want = _shapes(jax.eval_shape(lambda: init_params(checkpoint.config, jax.random.key(0))))
    got = _shapes(checkpoint.params)
    if got != want:
        missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
        wrong = sorted(k for k in want.keys() & got.keys() if want[k] != got[k])
        raise ValueError(
            f"{path}: parameters do not match its WanConfig (missing {missing[:3]}, unexpected "
            f"{extra[:3]}, wrong shapes {wrong[:3]})"
        )
