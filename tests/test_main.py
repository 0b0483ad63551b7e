"""The command line, run as a user runs it (subprocesses)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_main(*args, workdir):
  result = subprocess.run(
      [sys.executable, "-m", "moe_jax.main", f"--workdir={workdir}", *args],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  return result.returncode, result.stdout, result.stderr


@pytest.mark.slow
def test_smoke_preset_prepares_the_data_and_saves_the_config(tmp_path):
  code, out, err = run_main("--config=configs/a2d2.py:smoke", workdir=tmp_path)
  assert code == 0, err[-2000:]
  assert "all_train            16 frames" in out
  assert "ambiguous_test        4 frames" in out
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["data"]["data_dir"] == f"{tmp_path}/data/a2d2_synthetic"
  assert (tmp_path / "data" / "a2d2_synthetic" / "class_list.json").is_file()
  # A rerun reuses the generated tree and the shards.
  code, out, err = run_main("--config=configs/a2d2.py:smoke", workdir=tmp_path)
  assert code == 0 and "all_train            16 frames" in out


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--config=configs/a2d2.py:smoke", "--config.data.colour=1"],
     "error: unknown config key 'colour' on the command line"),
    (["--config=configs/a2d2.py:smoke", "--config.seed=one"],
     "error: bad command line: flag --config.seed=one: invalid literal for int()"),
    (["--config=configs/a2d2.py:huge"], "error: bad command line: ValueError: "
     "configs/a2d2.py: unknown preset 'huge'"),
    (["--config=configs/a2d2.py"], "error: config key data.data_dir is empty; set "
     "--config.data.data_dir=/path/to/a2d2, or run the demo with --config "
     "configs/a2d2.py:synthetic"),
    (["--config=configs/a2d2.py", "--config.data.data_dir=/no/such/a2d2"],
     "error: A2D2 data dir /no/such/a2d2 does not exist"),
    (["--config=configs/a2d2.py:smoke", "--config.data.image_size=(32,)"],
     "error: config key data.image_size=(32,) must be two positive ints"),
    (["--config=configs/a2d2.py:smoke", "--stages=data,dance"],
     "error: unknown stage(s) dance; implemented: data"),
])
def test_bad_input_gives_one_clear_line(tmp_path, args, message):
  code, out, err = run_main(*args, workdir=tmp_path / "run")
  assert code != 0
  last = err.strip().splitlines()[-1]
  assert last.startswith(message), last
  assert "Traceback" not in err


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  code, out, err = run_main("--config=configs/a2d2.py:smoke", workdir=blocker / "run")
  assert code != 0
  assert err.strip().splitlines()[-1].startswith(f"error: cannot create workdir {blocker}/run")
