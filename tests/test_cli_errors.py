"""The command line's errors and its data stage, run as a user runs them (subprocesses).

Apart from tests/test_main.py (the whole pipeline), so pytest-xdist runs the two files on
different workers.
"""

import json
from pathlib import Path

import pytest

from moe_jax import checkpoint


@pytest.mark.slow
def test_a_stage_before_its_inputs_exist_says_what_to_run(run_main, tmp_path):
  code, _, err = run_main("--config=configs/a2d2.py:smoke", "--stages=gate",
                          workdir=tmp_path)
  assert code != 0
  last = err.strip().splitlines()[-1]
  assert last.startswith("error: stage 'experts' has not finished in ") and \
      "run it first (--stages=experts)" in last, last


@pytest.mark.slow
def test_smoke_preset_prepares_the_data_and_saves_the_config(run_main, tmp_path):
  # A first attempt with a wrong data path fails but leaves nothing that blocks the
  # corrected command in the same workdir.
  code, _, err = run_main("--config=configs/a2d2.py", "--config.data.data_dir=/no/such",
                          workdir=tmp_path)
  assert code != 0 and "does not exist" in err
  code, out, err = run_main("--config=configs/a2d2.py:smoke", "--stages=data",
                            workdir=tmp_path)
  assert code == 0, err[-2000:]
  assert "all_train            16 frames" in out
  assert "ambiguous_test        4 frames" in out
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["data"]["data_dir"] == f"{tmp_path}/data/a2d2_synthetic"
  assert (tmp_path / "data" / "a2d2_synthetic" / "class_list.json").is_file()
  # A rerun reuses the generated tree and the shards, and reads their sizes without loading
  # TensorFlow (~5 s; Python's import log names every module the run imported).
  code, out, err = run_main("--config=configs/a2d2.py:smoke", "--stages=data",
                            workdir=tmp_path, env={"PYTHONPROFILEIMPORTTIME": "1"})
  assert code == 0 and "all_train            16 frames" in out
  imported = {line.rsplit("|", 1)[-1].strip() for line in err.splitlines()
              if line.startswith("import time:")}
  assert "tensorflow_datasets" in imported and "tensorflow" not in imported


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
    (["--config=configs/a2d2.py:smoke", "--config.data.image_size=(40,48)"],
     "error: config key data.image_size=(40, 48) must be multiples of 16"),
    (["--config=configs/a2d2.py:smoke", "--config.train.experts.optimizer.name=lion",
      "--stages=experts"], "error: config key train.experts.optimizer.name='lion'; use 'sgd'"),
    (["--config=configs/a2d2.py:smoke", "--config.train.baseline.batch_size=64",
      "--stages=baseline"], "error: config key train.baseline.batch_size=64 is larger than"),
    (["--config=configs/a2d2.py:smoke", "--config.model.gates=('simple','fancy')"],
     "error: config key model.gates=('simple', 'fancy') must name distinct gate types"),
    (["--config=configs/a2d2.py:smoke", "--config.eval.corruptions=('rain',)"],
     "error: config key eval.corruptions names unknown corruptions ['rain']"),
    (["--config=configs/a2d2.py:smoke", "--config.model.backbone_weights=/no/such.pth",
      "--stages=experts"],
     "error: config key model.backbone_weights='/no/such.pth': no such file"),
    (["--config=configs/a2d2.py:smoke", "--stages=data,dance"],
     "error: unknown stage(s) dance; the stages: data, baseline, experts"),
    (["--config=configs/a2d2.py:smoke", "--config.train.experts.init_from=gate",
      "--stages=experts"],
     "error: config key train.experts.init_from='gate'; use '' or 'baseline'"),
    # Experts fine-tuned from a baseline that was never trained.
    (["--config=configs/cityscapes.py:smoke", "--stages=experts"],
     "error: stage 'baseline' has not finished in"),
    (["--config=configs/a2d2.py:smoke", "--config.train.nonfinite=ignore", "--stages=experts"],
     "error: config key train.nonfinite='ignore'; use 'stop' or 'skip'"),
    # Diverges at once: stops at the step, exits non-zero, saves nothing non-finite.
    (["--config=configs/a2d2.py:smoke", "--config.train.experts.optimizer.learning_rate=1e30",
      "--stages=experts"], "error: experts: loss is nan at step 2; stopped, no checkpoint "
     "was written yet"),
])
def test_bad_input_gives_one_clear_line(run_main, tmp_path, args, message):
  code, out, err = run_main(*args, workdir=tmp_path / "run")
  assert code != 0
  last = err.strip().splitlines()[-1]
  assert last.startswith(message), last
  assert "Traceback" not in err
  # Nothing trained or measured was written, so nothing binds the workdir to this config.
  assert not checkpoint.has_results(tmp_path / "run")


def test_unwritable_workdir(run_main, tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  code, out, err = run_main("--config=configs/a2d2.py:smoke", workdir=blocker / "run")
  assert code != 0
  assert err.strip().splitlines()[-1].startswith(f"error: cannot create workdir {blocker}/run")


def test_a_tilde_the_shell_left_in_the_workdir_is_the_home_directory(run_main, tmp_path):
  """--workdir=~/x: bash expands no tilde after "=", so the CLI gets "~/x" literally."""
  repo = Path(__file__).resolve().parents[1]
  code, out, err = run_main("--config=configs/a2d2.py:smoke", "--stages=data",
                            workdir="~/tilde_run", env={"HOME": str(tmp_path)})
  assert code == 0, err[-2000:]
  assert (tmp_path / "tilde_run" / "config.json").is_file()
  assert (tmp_path / "tilde_run" / "data" / "a2d2_synthetic").is_dir()
  assert not (repo / "~").exists()


@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    ("eval.batch_size=0", "error: config key eval.batch_size=0 must be"),
    ("eval.mc_dropout_passes=(0,)", "error: config key eval.mc_dropout_passes=0 must be"),
    ("train.keep_checkpoints=0", "error: config key train.keep_checkpoints=0 must be"),
    ("train.log_every=0", "error: config key train.log_every=0 must be"),
])
def test_a_zero_count_is_refused_before_it_touches_a_finished_run(run_main, tmp_path,
                                                                  override, message):
  """On a workdir holding results: refused before any work, every file as it was."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  files = {"results.json": '{"splits": {}}\n', "config.json": "{}\n", "report.md": "# R\n"}
  for name, text in files.items():
    (workdir / name).write_text(text)
  code, out, err = run_main("--config=configs/a2d2.py:smoke", f"--config.{override}",
                            workdir=workdir)
  assert code == 1 and out == "", out
  assert err.strip().splitlines()[-1].startswith(message), err
  assert {p.name: p.read_text() for p in workdir.iterdir()} == files
