"""Shared pytest set-up: `gpu` tests run only where JAX sees a GPU; hypothesis without deadlines
(JIT compilation makes first examples slow); a CPU pool large enough for Mosaic GPU's
interpreter; compile-time savings on CPU (LLVM optimizations off, one persistent compilation
cache) and the environment for subprocesses; the tiny Wan DiT every model test starts from."""

import importlib.util
import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Mosaic GPU's interpreter runs each warpgroup as a CPU computation that waits for the others in
# host callbacks holding threads of XLA's CPU pool, one thread per core by default: on CI's two
# cores about one interpreted launch in fifty deadlocked (CI timed out). Eight threads leave a
# launch of four warpgroups room to finish (`mosaic_fpsa_fwd.warn_if_interpreter_may_deadlock`).
os.environ.setdefault("PJRT_NPROC", "8")
# Compile time dominates the CPU suite (a tiny train step takes 23 s in XLA's default CPU
# pipeline), so on a machine without a CUDA plugin the tests compile with LLVM's optimizations off
# (train step 8.5 s; the FP8 xla/pallas attention tests 100 -> 44 s): every program is the same
# HLO, only its machine code is less optimized. And one persistent compilation cache serves the
# xdist workers and (through `subprocess_env`) the subprocesses that CLI tests start, so a
# program compiled in several tests (resume runs, CLI re-runs) compiles once; entries are keyed
# by the program, backend, flags and jax version, so a hit runs the same executable. A temp
# folder: CI machines start empty.
_CUDA = importlib.util.find_spec("jax_plugins") is not None and any(
    importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None for v in (12, 13)
)
TEST_ENV = {
    "JAX_COMPILATION_CACHE_DIR": os.environ.get(
        "JAX_COMPILATION_CACHE_DIR",
        str(Path(tempfile.gettempdir()) / f"fpsa-jax-tests-{os.getuid()}" / "jax-cache"),
    ),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2",
}
_CPU_XLA_FLAGS = () if _CUDA else ("--xla_backend_optimization_level=0",)
for _name, _value in TEST_ENV.items():
    os.environ.setdefault(_name, _value)
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *_CPU_XLA_FLAGS]).strip()


def subprocess_env(*xla_flags: str, pythonpath: bool = True) -> dict[str, str]:
    """A bare environment for a test's CPU subprocess: PATH, JAX on CPU, the repository on
    PYTHONPATH (unless `pythonpath` is False), the session's compilation cache and CPU XLA
    flags, plus `xla_flags` (e.g. a forced device count)."""
    env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", **TEST_ENV}
    if pythonpath:
        env["PYTHONPATH"] = str(ROOT)
    env["XLA_FLAGS"] = " ".join([*xla_flags, *_CPU_XLA_FLAGS])
    return env


def run_for_json(args: list[str], env: dict[str, str], timeout: float, cwd=ROOT):
    """Runs `args` (a test's helper script), asserts it exited 0 (its stderr tail otherwise) and
    returns the JSON value on the last line of its stdout."""
    import json
    import subprocess

    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from fpsa_jax.config import WanConfig  # noqa: E402

settings.register_profile("fpsa", deadline=None, print_blob=True)
settings.load_profile("fpsa")

# The tests' tiny Wan DiT: head_dim 12, patch (1, 2, 2), float32 compute. Tests needing another
# size take `TINY_WAN.replace(...)`, so every test model is this one or a stated edit of it. A
# constant, not a fixture: module-level helpers, tables and subprocess scripts import it.
TINY_WAN = WanConfig(
    dim=24,
    ffn_dim=32,
    num_heads=2,
    num_layers=2,
    in_dim=4,
    out_dim=4,
    text_dim=16,
    text_len=12,
    dtype="float32",
)


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a GPU (marker `gpu`)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
