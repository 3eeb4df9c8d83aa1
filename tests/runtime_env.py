"""Running a command as after the README's runtime install (`scripts/setup.sh`, no extras).

The tests' environment holds the test extras (torch, transformers, diffusers, pytest...), which
would hide a missing runtime dependency. `run_module` starts `python -m MODULE` in a process whose
imports are limited to the standard library, the first-party packages and the distributions that
pyproject's [project] dependencies pull in (transitively, extras and markers evaluated): every
import finder of the child is wrapped so that it finds no other top-level module, and importing
one raises ModuleNotFoundError (`importlib.util.find_spec` returns None) as in a runtime-only .venv.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = ("fpsa_jax", "infer", "train", "pallas_kernels")

# Runs in the child: a meta-path finder in front of every other one.
_BOOT = """
import importlib.machinery, json, os, runpy, sys, sysconfig
allowed = set(json.loads(os.environ.pop("FPSA_RUNTIME_MODULES")))
stdlib = tuple({sysconfig.get_paths()[k] + os.sep for k in ("stdlib", "platstdlib")})

def in_stdlib(top):  # private stdlib modules (_sysconfigdata_*) are not in stdlib_module_names
    spec = importlib.machinery.PathFinder.find_spec(top)
    origin = (spec and spec.origin) or ""
    return origin.startswith(stdlib) and "-packages" + os.sep not in origin

def blocked(name):
    return not (name in allowed or name in sys.stdlib_module_names or in_stdlib(name))

class RuntimeOnly:  # a finder that finds nothing outside the runtime install
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if "." not in name and blocked(name):
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.finder, attr)

sys.meta_path[:] = [RuntimeOnly(finder) for finder in sys.meta_path]
exec(os.environ.pop("FPSA_PATCH"))
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@functools.cache
def runtime_distributions() -> frozenset[str]:
    """Normalised names of the distributions a runtime install brings in."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [Requirement(d) for d in project["dependencies"]]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = _normalise(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(req.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here: nothing of it can be imported anyway
        for line in requires:
            sub = Requirement(line)
            extras = req.extras or {""}
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                todo.append(sub)
    return frozenset(seen)


@functools.cache
def runtime_modules() -> frozenset[str]:
    """Top-level import names a runtime install provides (first-party packages included)."""
    runtime = runtime_distributions()
    modules = {
        module
        for module, dists in importlib.metadata.packages_distributions().items()
        if any(_normalise(d) in runtime for d in dists)
    }
    return frozenset(modules | set(FIRST_PARTY))


def run_module(
    module: str,
    *args: str,
    cwd: Path,
    block: tuple[str, ...] = (),
    patch: str = "",
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """`python -m module *args` with only the runtime dependencies importable (and not even
    the modules in `block`); the code `patch` runs first (to fail or signal at a chosen
    point)."""
    allowed = sorted(runtime_modules() - set(block))
    env = {
        **subprocess_env(),  # PATH, PYTHONPATH, JAX on CPU, the tests' compile cache and flags
        "FPSA_RUNTIME_MODULES": json.dumps(allowed),
        "FPSA_PATCH": patch,
        "HOME": os.environ.get("HOME", "/tmp"),
    }
    return subprocess.run(
        [sys.executable, "-c", _BOOT, module, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
