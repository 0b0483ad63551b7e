"""Run a test script in a subprocess with 4 forced CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=4), the smoke config loaded as `config`."""

import os
from pathlib import Path
import subprocess
import sys

PREAMBLE = r'''
import importlib.util
import jax
assert jax.device_count() == 4, jax.devices()
_spec = importlib.util.spec_from_file_location("a2d2_config", "configs/a2d2.py")
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
config = _module.get_config("smoke")
'''


def run(script: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
  """`script` after PREAMBLE, in the repository root, with `args` as sys.argv[1:]."""
  env = {**os.environ, "XLA_FLAGS": " ".join([os.environ.get("XLA_FLAGS", ""),
                                              "--xla_force_host_platform_device_count=4"])}
  return subprocess.run([sys.executable, "-c", PREAMBLE + script, *args],
                        cwd=Path(__file__).resolve().parents[1], env=env,
                        capture_output=True, text=True, timeout=timeout)
