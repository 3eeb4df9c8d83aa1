"""Running Triton kernels under Triton's interpreter from a test: in a child process, because
TRITON_INTERPRET=1 must be set before Triton is first imported (and this process may hold the real
one)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def interpreted_results(module: str, function: str, tmp_dir: Path) -> dict[str, np.ndarray]:
    """Calls `module.function(path)` in a child with TRITON_INTERPRET=1 and JAX on the CPU, and
    returns the arrays it saved to `path` (.npz under `tmp_dir`). Skips without torch or triton
    (the interpreter runs kernels on torch CPU tensors)."""
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    path = tmp_dir / "raw.npz"
    env = dict(os.environ, TRITON_INTERPRET="1", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    code = f"from {module} import {function} as r; r({str(path)!r})"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(np.load(path))
