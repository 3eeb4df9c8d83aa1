"""Many command lines of one app in one process: what each would do before its work begins.

Every app checks its flags before any work (issue 15): weights, encoders, workdir writes. A
subprocess per bad flag would pay a JAX start-up each; `probe` runs all the cases of one app in
one child process instead, with the app's work functions replaced by a stop, and returns for each
case its outcome: "error: <the line the app prints>" (usage errors as `fpsa_jax.cli.run` prints
them, `SystemExit` messages as they are), or "work: <the work function reached>", plus what it
printed on stdout before that.

    probe("infer.__main__", [["--sample_shift=-1"]], work=["infer.__main__._generate_demo"],
          cwd=tmp_path)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tests.conftest import run_for_json, subprocess_env

ROOT = Path(__file__).resolve().parents[1]

_CHILD = """
import contextlib, importlib, io, json, sys
from absl import app, flags
from fpsa_jax import cli

request = json.loads(sys.argv[1])
module = importlib.import_module(request["module"])

class Reached(Exception):
    pass

def stop(name):
    def reached(*args, **kwargs):
        raise Reached(name)
    return reached

for name in request["work"]:
    owner, _, attr = name.rpartition(".")
    setattr(importlib.import_module(owner), attr, stop(name))

results = []
for argv in request["cases"]:
    flags.FLAGS.unparse_flags()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            rest = flags.FLAGS([request["module"], *argv])
            cli.check_flags()
            module.main(rest)
        outcome = "finished without reaching any work function"
    except Reached as e:
        outcome = f"work: {e}"
    except (flags.Error, app.UsageError) as e:
        outcome = f"error: {cli.error_line(e)}"
    except SystemExit as e:
        outcome = str(e.code)
    results.append({"outcome": outcome, "stdout": out.getvalue()})
print(json.dumps(results))
"""


def probe(
    module: str,
    cases: list[list[str]],
    *,
    work: list[str],
    cwd: Path,
    devices: int = 1,
    timeout: float = 120,
) -> list[dict[str, str]]:
    """[{"outcome", "stdout"}] of each case (flags of `python -m module`), on `devices` forced
    CPU devices."""
    env = subprocess_env(f"--xla_force_host_platform_device_count={devices}")
    env["HOME"] = os.environ.get("HOME", "/tmp")
    request = json.dumps({"module": module, "cases": cases, "work": work})
    return run_for_json([sys.executable, "-c", _CHILD, request], env, timeout, cwd=cwd)


def outcomes(*args, **kwargs) -> list[str]:
    """`probe`'s outcomes alone."""
    return [r["outcome"] for r in probe(*args, **kwargs)]
