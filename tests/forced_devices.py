"""Subprocesses with N forced CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N):
their environment, one XLA CPU thread count for every N, XLA's default code generation for
them, a free port for several of them to join jax.distributed on localhost, a test script
run on 4 devices with the smoke config as `config`, and the mesh tests' common setup."""

import os
from pathlib import Path
import socket
import subprocess
import sys

# The most devices a test forces.
MOST_DEVICES = 4


def pin_cpu_threads() -> None:
  """Sets NPROC to MOST_DEVICES (unless it is that or more), before JAX starts its CPU client.

  XLA's CPU client runs max($NPROC or the CPU count, device count) threads, and its
  compiler splits loops into that many parts, which rounds floats differently: on this
  2-core VM a one-device evaluation differed in 58 of 139 statistics between a process with
  1 forced device and one with 4, and in none with NPROC=4 in both (docs/scaling.md). With
  every test process at one thread count, a process's device count changes no number.
  """
  nproc = os.environ.get("NPROC", "")  # XLA ignores one that is not a number
  if not nproc.isdigit() or int(nproc) < MOST_DEVICES:
    os.environ["NPROC"] = str(MOST_DEVICES)


PREAMBLE = f'''
import importlib.util
import jax
assert jax.device_count() == {MOST_DEVICES}, jax.devices()
_spec = importlib.util.spec_from_file_location("a2d2_config", "configs/a2d2.py")
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
config = _module.get_config("smoke")
'''


def env(devices: int) -> dict[str, str]:
  """This process's environment for a subprocess with `devices` forced CPU devices (at
  most MOST_DEVICES: the thread count of `pin_cpu_threads` covers that many)."""
  assert devices <= MOST_DEVICES, devices
  flags = " ".join([os.environ.get("XLA_FLAGS", ""),
                    f"--xla_force_host_platform_device_count={devices}"])
  return {**os.environ, "XLA_FLAGS": flags}


def default_codegen(env: dict[str, str]) -> dict[str, str]:
  """`env` without the tests' --xla_cpu_use_fusion_emitters=false (tests/conftest.py).

  One device and a mesh evaluate bit for bit alike with XLA CPU's default fusion emitters,
  which users run. With the older elemental emitters a mesh's evaluation statistics
  differ from one device's by rounding (measured: 176 statistics on each mesh of
  tests/test_mesh_evaluation.py), so the checks of that claim run under the default.
  """
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_cpu_use_fusion_emitters")]
  return {**env, "XLA_FLAGS": " ".join(flags)}


def free_port() -> int:
  """A localhost port no one listens on (for JAX_COORDINATOR_ADDRESS)."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


# The meshes the mesh tests compare with one device, as their scripts print them.
MESHES = ("(4, 1)", "(2, 2)", "(1, 4)")
# The mesh tests' common part (after PREAMBLE): their models' settings, K = 4 experts, a
# stacked training batch, two evaluation batches (the second padded), and helpers.
MESH_SETUP = r'''
import json, logging, sys
import jax.numpy as jnp, numpy as np
import ml_collections
from flax import nnx

from moe_jax import (calibrate, checkpoint, evaluate, losses, methods, sharding,
                     stages, train)
from moe_jax.models import build

config.model.expert_execution = "vmap"
# Dropout off: the "rbg" PRNG draws a vmapped member's bits by the number of members
# mapped together, and a mesh maps K / expert of them per device (models/moe.py).
config.model.aspp_dropout = 0.0
K, B = 4, 4
h, w = config.data.image_size
rng = np.random.default_rng(0)
stacked_batch = {"image": rng.integers(0, 255, (K, B, h, w, 3), np.uint8),
                 "label": rng.integers(0, 38, (K, B, h, w), np.uint8)}
gate_batch = {key: value[0] for key, value in stacked_batch.items()}
eval_batches = [{"image": rng.integers(0, 255, (B, h, w, 3), np.uint8),
                 "label": rng.integers(0, 38, (B, h, w), np.uint8)} for _ in range(2)]
eval_batches[1]["label"][2:] = 255  # a padded last batch: its images count nothing
SHAPES = [(1, 1), (4, 1), (2, 2), (1, 4)]  # (data, expert); (1, 1) is one device


def mesh_of(shape):
  if shape == (1, 1):
    return sharding.one_device_mesh()
  config.mesh.data, config.mesh.expert = shape
  return sharding.make_mesh(config)


def floats(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)
          if jnp.issubdtype(x.dtype, jnp.floating)]
'''


def run(script: str, *args: str, timeout: int = 900,
        xla_defaults: bool = False) -> subprocess.CompletedProcess:
  """`script` after PREAMBLE, in the repository root, with `args` as sys.argv[1:]; under
  XLA's default code generation if `xla_defaults` (`default_codegen`)."""
  environment = default_codegen(env(MOST_DEVICES)) if xla_defaults else env(MOST_DEVICES)
  return subprocess.run([sys.executable, "-c", PREAMBLE + script, *args],
                        cwd=Path(__file__).resolve().parents[1], env=environment,
                        capture_output=True, text=True, timeout=timeout)
