"""Runs a check module in a subprocess with 8 forced CPU devices and returns the JSON it prints
last (JAX fixes its device count at import, and the test process has one device)."""

import os
import sys

from tests.conftest import run_for_json


def run_checks(module: str, timeout: int = 300) -> dict:
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
    return run_for_json([sys.executable, "-m", module], env, timeout)
