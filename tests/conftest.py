"""Shared fixtures: a small synthetic A2D2 tree, generated once per test session; the
command line as a subprocess."""

import os
from pathlib import Path
import shutil
import subprocess
import sys
import tempfile

import forced_devices

# The tests spend most of their time in XLA compiling small programs. Two flags compile
# them faster; set before JAX loads, and inherited by the xdist workers and the CLI
# subprocesses. Real runs and the benchmarks keep XLA's defaults.
# - LLVM at -O0: about a quarter faster (the smoke pipeline: 153 -> 113 s of CPU), the same
#   numbers.
# - XLA CPU's older elemental emitters instead of its fusion emitters: the smoke pipeline's
#   expert train step compiles in 3.5 s instead of 7.5 s, the whole pipeline runs in 86 s
#   instead of 139 s (215 GFLOP/s). Numbers differ from the default's by rounding, which
#   training carries on (every test compares runs made under the same flags).
# An XLA that does not know a flag aborts at start, so the first pytest process keeps only
# what the installed one accepts (the xdist workers find them set and probe nothing).
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def _xla_accepts(flags: list[str]) -> bool:
  probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"],
                         env={**os.environ, "XLA_FLAGS": " ".join(flags)}, capture_output=True)
  return probe.returncode == 0


def _add_fast_compile_flags() -> None:
  present = os.environ.get("XLA_FLAGS", "").split()
  missing = [f for f in FAST_COMPILE_FLAGS
             if not any(p.split("=")[0] == f.split("=")[0] for p in present)]
  if missing and not _xla_accepts(present + missing):  # one probe unless one is refused
    refused = [f for f in missing if not _xla_accepts(present + [f])]
    print(f"tests/conftest.py: this XLA refuses {' '.join(refused)}; the tests compile "
          "slower without it", file=sys.stderr)
    missing = [f for f in missing if f not in refused]
  os.environ["XLA_FLAGS"] = " ".join(present + missing)


_add_fast_compile_flags()

# The end-to-end tests run the same pipeline in many subprocesses (the smoke fixture, kill and
# resume, the CLI's error paths, four devices, two processes), and each used to compile every
# program again. JAX's persistent compilation cache, in a directory of this session only,
# lets a later process load what an earlier one compiled. The first pytest process (xdist's
# controller) makes it; the workers and the CLI subprocesses inherit it through the
# environment. A loaded executable is the one that was compiled, so the numbers are the
# same. The key leaves out the forced device count; XLA CPU compiles for its client's
# thread count, which the device count raises, so every test process gets one thread count
# (forced_devices.pin_cpu_threads) and shares one cache whatever its devices.
forced_devices.pin_cpu_threads()
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="moe_jax-tests-xla-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax  # noqa: E402
import pytest

from data_pipelines import synthetic

# Tests also build small models from plain nnx.Rngs(int): as the library does for its own
# (moe_jax.models.build.key), use "rbg", which compiles parameter initialisation ~4x
# faster than threefry on XLA CPU (ResNet-18 DeepLab x4 experts, 17 s -> 4 s). The library
# never reads this default (tests/test_checkpoint.py saves under threefry and restores).
jax.config.update("jax_default_prng_impl", "rbg")


@pytest.fixture(scope="session")
def a2d2_root(tmp_path_factory):
  """A synthetic A2D2 tree: 8 train, 3 val, 4 test frames per domain at 48x80."""
  root = tmp_path_factory.mktemp("a2d2") / "raw"
  return synthetic.generate(root, num_train=8, num_val=3, num_test=4, image_size=(48, 80),
                            seed=0)


@pytest.fixture(scope="session")
def run_main():
  """`run_main(*args, workdir=..., env=None) -> (returncode, stdout, stderr)` of
  `python -m moe_jax.main` in the repository, as a user runs it."""
  repo = Path(__file__).resolve().parents[1]

  def run(*args, workdir, env=None):
    result = subprocess.run(
        [sys.executable, "-m", "moe_jax.main", f"--workdir={workdir}", *args],
        cwd=repo, capture_output=True, text=True, timeout=900,
        env=None if env is None else {**os.environ, **env})
    return result.returncode, result.stdout, result.stderr
  return run


def pytest_xdist_auto_num_workers(config):
  """`-n auto` (pyproject.toml): one worker more than this process may use CPUs. A worker
  whose test waits on its subprocesses (the command line, forced devices) leaves its CPU
  to the others: on the 2-core VM three workers kept both cores busy and ran the suite in
  10 min 26 s where two took 11 min 2 s."""
  cpus = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")  # not on macOS
          else os.cpu_count() or 1)
  return cpus + 1


# Files whose tests run for minutes (the smoke pipeline's subprocess, four devices, every
# Bayesian router) go first, so that xdist's workers start them early and finish together
# instead of one worker taking the smoke pipeline last.
FIRST = ("test_main.py", "test_num_experts.py", "test_mesh.py", "test_mesh_evaluation.py",
         "test_processes.py", "test_bayesian_routers.py")


def pytest_collection_modifyitems(items):
  # In FIRST's order (stable: the rest keep theirs), so the smoke pipeline starts at once.
  items.sort(key=lambda item: FIRST.index(item.path.name) if item.path.name in FIRST
             else len(FIRST))


def pytest_unconfigure(config):
  if _OWN_CACHE and not hasattr(config, "workerinput"):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
