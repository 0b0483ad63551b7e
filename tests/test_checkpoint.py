"""Stage checkpoints (Orbax) and config.json: round trips, retention, resume, bad input."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import forced_devices
from moe_jax import checkpoint, output_files
from moe_jax.checkpoint import CheckpointError, StageCheckpoints

REPO = pathlib.Path(__file__).resolve().parents[1]


def _state(step: int) -> dict:
  """A nested training-state-like pytree whose values encode `step`."""
  return {
      "params": {"w": jnp.full((2, 3), step, jnp.float32),
                 "layers": [jnp.arange(4, dtype=jnp.int32) + step,
                            np.full((5,), step / 2, np.float32)]},
      "step": step,
  }


def _abstract() -> dict:
  return {
      "params": {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32),
                 "layers": [jax.ShapeDtypeStruct((4,), jnp.int32),
                            jax.ShapeDtypeStruct((5,), jnp.float32)]},
      "step": 0,
  }


def _step_dirs(ckpts: StageCheckpoints) -> list[int]:
  """Step directories really on disk (not Orbax's cached view)."""
  return sorted(int(p.name) for p in ckpts.directory.iterdir() if p.name.isdigit())


def _assert_tree_equal(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    assert getattr(x, "dtype", type(x)) == getattr(y, "dtype", type(y))
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


class _Net(nnx.Module):

  def __init__(self, features: int, rngs: nnx.Rngs):
    self.linear = nnx.Linear(3, features, rngs=rngs)
    self.norm = nnx.BatchNorm(features, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, x):
    return self.drop(self.norm(self.linear(x)))


# ------------------------------------------------------------------- round trips

def test_nested_pytree_round_trip(tmp_path):
  with StageCheckpoints(tmp_path, "baseline", save_every=1) as ckpts:
    assert ckpts.save(3, _state(3), val_miou=0.25)
    state, meta = ckpts.restore(None, _abstract())
  assert ckpts.directory == tmp_path.resolve() / "checkpoints" / "baseline"
  _assert_tree_equal(state, _state(3))
  assert meta == {"step": 3, "val_miou": 0.25, "finished": False}
  device = jax.devices()[0]
  for leaf in jax.tree.leaves(state["params"]):
    assert isinstance(leaf, jax.Array) and leaf.devices() == {device}


def test_concrete_arrays_work_as_restore_target(tmp_path):
  with StageCheckpoints(tmp_path, "baseline", save_every=1) as ckpts:
    ckpts.save(1, _state(1))
    zeros = jax.tree.map(jnp.zeros_like, _state(0))
    state, _ = ckpts.restore(1, zeros)
  np.testing.assert_array_equal(state["params"]["w"], np.ones((2, 3), np.float32))
  assert state["step"] == 1


def test_nnx_model_and_optimizer_state_round_trip(tmp_path):
  model = _Net(4, nnx.Rngs(0))
  model.train()
  model(jax.random.normal(jax.random.key(1), (8, 3)))  # moves BatchNorm's running stats
  tx = optax.adam(1e-3)
  opt_state = tx.init(nnx.state(model, nnx.Param))
  graphdef, model_state = nnx.split(model)
  with StageCheckpoints(tmp_path, "experts", save_every=1) as ckpts:
    ckpts.save(7, {"model": model_state, "opt_state": opt_state, "step": 7})

  # A rerun builds the target without allocating anything, from a different seed.
  abstract_model = nnx.eval_shape(lambda: _Net(4, nnx.Rngs(123)))
  _, abstract_model_state = nnx.split(abstract_model)
  abstract = {"model": abstract_model_state,
              "opt_state": jax.eval_shape(tx.init, nnx.state(abstract_model, nnx.Param)),
              "step": 0}
  with StageCheckpoints(tmp_path, "experts", save_every=1) as ckpts:
    restored, meta = ckpts.restore(None, abstract)
  assert meta["step"] == 7 and restored["step"] == 7
  restored_model = nnx.merge(graphdef, restored["model"])
  model.eval()
  restored_model.eval()
  x = jax.random.normal(jax.random.key(2), (5, 3))
  np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(restored_model(x)))
  np.testing.assert_array_equal(np.asarray(restored_model.norm.mean.value),
                                np.asarray(model.norm.mean.value))
  assert np.asarray(model.norm.mean.value).any()  # the stats that must survive are not 0
  np.testing.assert_array_equal(jax.random.key_data(restored_model.drop.rngs.key.value),
                                jax.random.key_data(model.drop.rngs.key.value))
  _assert_tree_equal(restored["opt_state"], opt_state)

  # Inference asks for the model alone: the optimiser state is not read.
  with StageCheckpoints(tmp_path, "experts", save_every=1) as ckpts:
    only, meta = ckpts.restore(None, {"model": abstract_model_state}, partial=True)
    with pytest.raises(CheckpointError, match=r"has no 'ema' state \(it has model, "
                       r"opt_state, step\); is it a different stage's\?"):
      ckpts.restore(None, {"ema": abstract_model_state}, partial=True)
  assert set(only) == {"model"} and meta["step"] == 7
  _assert_tree_equal(only["model"], restored["model"])  # PRNG key and BatchNorm stats too


def test_restore_ignores_the_device_that_wrote_the_checkpoint(tmp_path):
  # The writer has two (host) devices and puts the state on the second one; the checkpoint
  # metadata then names cpu:1. Restoring must place everything on this process's
  # jax.devices()[0] instead of following that metadata.
  writer = textwrap.dedent(f"""
      import jax, jax.numpy as jnp
      from moe_jax.checkpoint import StageCheckpoints
      dev = jax.devices()[1]
      state = {{"w": jax.device_put(jnp.arange(6.0).reshape(2, 3), dev)}}
      with StageCheckpoints({str(tmp_path)!r}, "gate", save_every=1) as c:
        c.save(1, state)
        print(c._manager.item_metadata(1)["state"].tree["w"].sharding)
  """)
  env = {**forced_devices.env(2), "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  out = subprocess.run([sys.executable, "-c", writer], env=env, cwd=REPO, text=True,
                       capture_output=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "cpu:1" in out.stdout  # the saved metadata really points at another device
  with StageCheckpoints(tmp_path, "gate", save_every=1) as ckpts:
    state, _ = ckpts.restore(None, {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)})
  assert state["w"].devices() == {jax.devices()[0]}
  np.testing.assert_array_equal(state["w"], np.arange(6.0).reshape(2, 3))


# ------------------------------------------------------------------- schedule and retention

def test_save_every_decides_which_steps_are_written(tmp_path):
  with StageCheckpoints(tmp_path, "experts", save_every=5, keep=10) as ckpts:
    assert ckpts.latest_step() is None
    written = [s for s in range(1, 13) if ckpts.save(s, _state(s))]
    assert written == [5, 10]
    assert ckpts.latest_step() == 10
    assert ckpts.all_steps() == [5, 10]
    assert ckpts.save(12, _state(12), force=True)  # forced: off the interval
    assert ckpts.latest_step() == 12
    assert not ckpts.save(10, _state(10))  # steps only move forward
  assert _step_dirs(ckpts) == [5, 10, 12]


def test_keep_bounds_the_steps_on_disk(tmp_path):
  with StageCheckpoints(tmp_path, "baseline", save_every=1, keep=3) as ckpts:
    for step in range(1, 11):
      ckpts.save(step, _state(step))
      assert len(_step_dirs(ckpts)) <= 3
  assert _step_dirs(ckpts) == [8, 9, 10]


def test_best_by_val_miou_is_kept_and_restored_when_not_latest(tmp_path):
  mious = {1: 0.2, 2: 0.3, 3: 0.7, 4: 0.5, 5: 0.4, 6: None, 7: 0.6, 8: 0.1}
  with StageCheckpoints(tmp_path, "experts", save_every=1, keep=2) as ckpts:
    for step, miou in mious.items():
      ckpts.save(step, _state(step), val_miou=miou)
    assert _step_dirs(ckpts) == [3, 7, 8]  # latest 2 + best
    assert ckpts.best_step() == 3
    best, meta = ckpts.restore_best(_abstract())
    latest, latest_meta = ckpts.restore(None, _abstract())
  assert meta == {"step": 3, "val_miou": 0.7, "finished": False}
  np.testing.assert_array_equal(best["params"]["w"], np.full((2, 3), 3.0))
  assert latest_meta["step"] == 8 and latest["step"] == 8
  # A later, better step takes over and the old best may go.
  with StageCheckpoints(tmp_path, "experts", save_every=1, keep=2) as ckpts:
    ckpts.save(9, _state(9), val_miou=0.9)
    assert ckpts.best_step() == 9
    assert _step_dirs(ckpts) == [8, 9]


def test_restore_best_without_any_val_miou_is_the_latest(tmp_path):
  with StageCheckpoints(tmp_path, "gate", save_every=1, keep=2) as ckpts:
    for step in (1, 2, 3):
      ckpts.save(step, _state(step))
    _, meta = ckpts.restore_best(_abstract())
  assert meta["step"] == 3
  assert _step_dirs(ckpts) == [2, 3]


# ------------------------------------------------------------------- resume and finish

def test_rerun_resumes_from_latest_step(tmp_path):
  with StageCheckpoints(tmp_path, "experts", save_every=5) as ckpts:
    for step in range(1, 14):
      ckpts.save(step, _state(step))
  # A crash after step 13: a new process opens the same stage.
  with StageCheckpoints(tmp_path, "experts", save_every=5) as rerun:
    assert rerun.latest_step() == 10
    assert not rerun.is_finished()
    state, meta = rerun.restore(None, _abstract())
    assert state["step"] == 10 and meta["step"] == 10
    assert rerun.save(15, _state(15))
    assert rerun.latest_step() == 15


def test_is_finished(tmp_path):
  with StageCheckpoints(tmp_path, "gate", save_every=10) as ckpts:
    assert not ckpts.is_finished()
    ckpts.save(10, _state(10), val_miou=0.5)
    assert not ckpts.is_finished()
    assert ckpts.save(13, _state(13), val_miou=0.4, finished=True)  # off-interval, still saved
    assert ckpts.is_finished()
    with pytest.raises(CheckpointError, match="step 13 is already saved"):
      ckpts.save(13, _state(13), finished=True)
  with StageCheckpoints(tmp_path, "gate", save_every=10) as rerun:
    assert rerun.is_finished()
    assert rerun.read_meta() == {"step": 13, "val_miou": 0.4, "finished": True}
  with StageCheckpoints(tmp_path, "experts", save_every=10) as other_stage:
    assert not other_stage.is_finished()


# ------------------------------------------------------------------- partial / damaged steps

def test_interrupted_save_tmp_dir_is_ignored_and_removed(tmp_path):
  with StageCheckpoints(tmp_path, "experts", save_every=5) as ckpts:
    ckpts.save(5, _state(5))
    ckpts.save(10, _state(10))
    directory = ckpts.directory
  # What a run killed while writing step 15 leaves behind (Orbax's in-progress name).
  tmp = directory / "15.orbax-checkpoint-tmp-1712345678901234"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "d").write_bytes(b"\x00garbage")
  with StageCheckpoints(tmp_path, "experts", save_every=5) as rerun:
    assert rerun.latest_step() == 10
    state, _ = rerun.restore(None, _abstract())
    assert state["step"] == 10
    assert not tmp.exists()
    assert rerun.save(15, _state(15))
  assert _step_dirs(rerun) == [10, 15]


def test_garbage_step_dir_is_set_aside_and_previous_step_used(tmp_path):
  with StageCheckpoints(tmp_path, "experts", save_every=5) as ckpts:
    ckpts.save(5, _state(5))
    ckpts.save(10, _state(10))
    directory = ckpts.directory
  (directory / "15" / "state").mkdir(parents=True)
  (directory / "15" / "state" / "_METADATA").write_text("{not json")
  (directory / "20").mkdir()
  (directory / "20" / "junk").write_text("half a copy")
  with StageCheckpoints(tmp_path, "experts", save_every=5) as rerun:
    assert rerun.latest_step() == 10
    state, meta = rerun.restore(None, _abstract())
    assert state["step"] == 10 and meta["step"] == 10
    assert rerun.save(15, _state(15))  # the step number is free again
    assert rerun.latest_step() == 15
  assert (directory / "15.invalid" / "state" / "_METADATA").read_text() == "{not json"
  assert (directory / "20.invalid" / "junk").exists()


def _largest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
  return max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)


def _big_state(step: int) -> dict:
  """400 kB of random floats (which compression cannot shrink) and the step."""
  return {"w": np.random.default_rng(step).normal(size=100_000).astype(np.float32),
          "step": step}


def _big_abstract() -> dict:
  return {"w": jax.ShapeDtypeStruct((100_000,), jnp.float32), "step": 0}


def _truncate(path: pathlib.Path):
  os.truncate(path, path.stat().st_size // 2)


def _zero_the_start(path: pathlib.Path):
  with open(path, "r+b") as f:
    f.write(b"\0" * 1000)


@pytest.mark.parametrize("damage", [_truncate, _zero_the_start])
def test_damaged_latest_step_falls_back_to_the_previous_one_with_a_warning(tmp_path, caplog,
                                                                           damage):
  # Halving the array file breaks the step's metadata too (found on open); zeroing its
  # start leaves the metadata readable, so only reading the arrays finds it (on restore).
  with StageCheckpoints(tmp_path, "experts", save_every=5) as ckpts:
    ckpts.save(5, _big_state(5))
    ckpts.save(10, _big_state(10))
    directory = ckpts.directory
  damage(_largest_array_file(directory / "10"))
  with StageCheckpoints(tmp_path, "experts", save_every=5) as rerun:
    state, meta = rerun.restore(None, _big_abstract())
    assert meta["step"] == 5 and state["step"] == 5
    np.testing.assert_array_equal(np.asarray(state["w"]), _big_state(5)["w"])
    assert rerun.latest_step() == 5 and rerun.save(10, _big_state(10))  # redone
  assert f"checkpoint {directory / '10'} is unreadable" in caplog.text
  assert "moved it to 10.invalid and use the steps before it" in caplog.text
  assert (directory / "10.invalid").is_dir()


def test_damaged_best_step_is_an_error_that_says_how_to_redo_it(tmp_path):
  with StageCheckpoints(tmp_path, "gate", save_every=1) as ckpts:
    ckpts.save(1, _big_state(1), val_miou=0.5)
    ckpts.save(2, _big_state(2), val_miou=0.1, finished=True)
    data = _largest_array_file(ckpts.directory / "1")
    data.write_bytes(b"\0" * data.stat().st_size)  # same size, zeroed
    with pytest.raises(CheckpointError) as info:
      ckpts.restore_best(_big_abstract())  # a named step never silently becomes another
    assert ckpts.all_steps() == [2]
  message = str(info.value)
  assert message.startswith(f"checkpoint {ckpts.directory / '1'} could not be read (")
  assert "moved it to 1.invalid. Rerun the 'gate' stage" in message and "\n" not in message


def test_disk_full_during_a_save_leaves_the_previous_checkpoint_and_no_partial_step(
    tmp_path):
  # A real failed write: the file-size limit makes TensorStore's write of the array file
  # fail half-way (EFBIG, as a full disk gives ENOSPC); CPython ignores SIGXFSZ.
  import resource
  with StageCheckpoints(tmp_path, "experts", save_every=5) as ckpts:
    ckpts.save(5, _big_state(5))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))  # the array needs 400 kB
    try:
      with pytest.raises(CheckpointError) as info:
        ckpts.save(10, _big_state(10))
    finally:
      resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert sorted(p.name for p in ckpts.directory.iterdir()) == ["5"]  # no tmp dir left
    assert ckpts.latest_step() == 5
    state, _ = ckpts.restore(None, _big_abstract())
    np.testing.assert_array_equal(np.asarray(state["w"]), _big_state(5)["w"])
    assert ckpts.save(10, _big_state(10))  # once there is room again, the step saves
  message = str(info.value)
  assert message.startswith(f"could not write the checkpoint of step 10 to {ckpts.directory} (")
  assert "File too large" in message and "the last complete checkpoint (step 5) is intact" \
      in message and "rerun the same command to resume" in message


# ------------------------------------------------------------------- errors

def test_shape_mismatch_names_the_parameter(tmp_path):
  _, saved = nnx.split(_Net(4, nnx.Rngs(0)))
  with StageCheckpoints(tmp_path, "experts", save_every=1) as ckpts:
    ckpts.save(1, saved)
    _, abstract = nnx.split(nnx.eval_shape(lambda: _Net(6, nnx.Rngs(0))))
    with pytest.raises(CheckpointError) as info:
      ckpts.restore(None, abstract)
  message = str(info.value)
  assert "\n" not in message
  assert str(ckpts.directory / "1") in message
  assert "'linear/bias/value' has shape (6,) here vs (4,) in the checkpoint" in message
  assert "more difference" in message  # kernel and the BatchNorm leaves differ too
  assert "fresh --workdir" in message


def test_structure_mismatch_names_the_missing_and_extra_entries(tmp_path):
  with StageCheckpoints(tmp_path, "baseline", save_every=1) as ckpts:
    ckpts.save(1, _state(1))
    extra = {**_abstract(), "ema": jax.ShapeDtypeStruct((3,), jnp.float32)}
    with pytest.raises(CheckpointError, match="'ema' is in this model but not in the checkpoint"):
      ckpts.restore(1, extra)
    fewer = {"params": {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)}, "step": 0}
    with pytest.raises(CheckpointError, match="'params/layers/0' is in the checkpoint but not"):
      ckpts.restore(1, fewer)


def test_empty_stage_has_no_checkpoint(tmp_path):
  with StageCheckpoints(tmp_path, "gate", save_every=1) as ckpts:
    assert ckpts.latest_step() is None and ckpts.best_step() is None
    assert not ckpts.is_finished()
    with pytest.raises(CheckpointError, match=r"no checkpoint in .*checkpoints/gate; run the"):
      ckpts.restore(None, _abstract())
    with pytest.raises(CheckpointError, match="no checkpoint in"):
      ckpts.restore_best(_abstract())
    ckpts.save(2, _state(2))
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 3 .*steps there: 2"):
      ckpts.restore(3, _abstract())


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="save_every"):
    StageCheckpoints(tmp_path, "gate", save_every=0)
  with pytest.raises(ValueError, match="keep"):
    StageCheckpoints(tmp_path, "gate", save_every=1, keep=0)


# ------------------------------------------------------------------- config.json

def test_config_round_trip(tmp_path):
  config = {"data": {"name": "a2d2", "image_size": [96, 160]}, "train": {"lr": 0.01,
                                                                        "steps": 100}}
  path = checkpoint.save_config(tmp_path / "run", config)
  assert path == tmp_path / "run" / "config.json"
  assert checkpoint.load_config(tmp_path / "run") == config
  checkpoint.save_config(tmp_path / "run", json.dumps({"seed": 3}))  # JSON text works too
  assert checkpoint.load_config(tmp_path / "run") == {"seed": 3}
  assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json"]


def test_config_is_never_half_written(tmp_path, monkeypatch):
  checkpoint.save_config(tmp_path, {"version": 1})
  before = (tmp_path / "config.json").read_text()
  written = []
  real_replace = os.replace

  def crash_before_rename(src, dst):
    written.append(pathlib.Path(src).read_text())  # the new text was complete in the tmp
    raise OSError("killed before the rename")

  monkeypatch.setattr(os, "replace", crash_before_rename)
  with pytest.raises(output_files.OutputError, match=r"\(killed before the rename\); the "
                     "previous config.json is intact"):
    checkpoint.save_config(tmp_path, {"version": 2, "big": list(range(1000))})
  assert (tmp_path / "config.json").read_text() == before
  assert json.loads(written[0])["version"] == 2
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # tmp cleaned up
  monkeypatch.setattr(os, "replace", real_replace)
  with pytest.raises(TypeError):  # not JSON-able: fails before touching the file
    checkpoint.save_config(tmp_path, {"version": 3, "bad": object()})
  assert checkpoint.load_config(tmp_path) == {"version": 1}


def test_load_config_errors(tmp_path):
  with pytest.raises(CheckpointError, match="no config.json in"):
    checkpoint.load_config(tmp_path)
  (tmp_path / "config.json").write_text('{"a": 1')
  with pytest.raises(CheckpointError, match="not valid JSON"):
    checkpoint.load_config(tmp_path)
  with pytest.raises(ValueError, match="JSON object"):
    checkpoint.save_config(tmp_path, "[1, 2]")


def test_a_changed_config_is_refused_naming_the_key(tmp_path):
  config = {"seed": 0, "model": {"width": 0.5, "deep_ensemble_members": 0},
            "train": {"experts": {"epochs": 6}, "log_every": 5}, "eval": {"batch_size": 4}}
  checkpoint.check_same_run(tmp_path, config)  # no config.json yet: anything goes
  checkpoint.save_config(tmp_path, config)
  # Nothing trained yet (a run that failed early): a corrected config may replace it.
  checkpoint.check_same_run(tmp_path, {**config, "seed": 1})
  with StageCheckpoints(tmp_path, "experts", save_every=1) as ckpts:
    ckpts.save(1, _state(1))
  checkpoint.check_same_run(tmp_path, config)
  # What does not change a trained stage may change.
  checkpoint.check_same_run(tmp_path, {**config, "eval": {"batch_size": 16},
                                       "model": {"width": 0.5, "deep_ensemble_members": 2},
                                       "train": {"experts": {"epochs": 6}, "log_every": 1,
                                                 "nonfinite": "skip"}})
  # A key added since, at its old meaning, matches a config.json written before it.
  checkpoint.check_same_run(tmp_path, {**config, "model": {**config["model"],
                                                           "backbone_weights": ""}})
  with pytest.raises(checkpoint.CheckpointError, match="backbone_weights='r.pth' differs"):
    checkpoint.check_same_run(tmp_path, {**config, "model": {**config["model"],
                                                             "backbone_weights": "r.pth"}})
  changed = {**config, "train": {"experts": {"epochs": 2}, "log_every": 5}}
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"config key train.experts.epochs=2 differs from the run in .* "
                           r"\(6 there\); use a fresh --workdir"):
    checkpoint.check_same_run(tmp_path, changed)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"model.depth=3 differs .* \(None there\) \(and 1 more\)"):
    checkpoint.check_same_run(tmp_path, {**config, "model": {"depth": 3}})
  # Results alone bind the config as well.
  shutil.rmtree(tmp_path / "checkpoints")
  (tmp_path / "results.json").write_text("{}")
  with pytest.raises(checkpoint.CheckpointError, match="seed=1 differs"):
    checkpoint.check_same_run(tmp_path, {**config, "seed": 1})


# ------------------------------------------------------------------- no code from files

def test_no_loader_in_the_package_can_unpickle():
  """Every file read goes through a loader that refuses code: Orbax and JSON for runs,
  `np.load(..., allow_pickle=False)`, `torch.load(..., weights_only=True)`; nothing calls
  pickle's loaders. (The refusals themselves are tested in test_plots.py and
  test_pretrained.py with payloads that would run.)"""
  calls = {"np.load(": "allow_pickle=False", "torch.load(": "weights_only=True"}
  problems = []
  for path in sorted(p for d in ("moe_jax", "data_pipelines", "benchmarks")
                     for p in (REPO / d).rglob("*.py")):
    for number, line in enumerate(path.read_text().splitlines(), 1):
      code = line.split("#")[0]
      where = f"{path.relative_to(REPO)}:{number}"
      for call, needed in calls.items():
        if call in code and needed not in code:
          problems.append(f"{where}: {call} without {needed}")
      for unsafe in ("pickle.load", "allow_pickle=True", "weights_only=False", "cloudpickle",
                     "dill"):
        if unsafe in code:
          problems.append(f"{where}: {unsafe}")
  assert not problems, problems


def test_a_checkpoint_saved_through_the_library_restores_whatever_the_default_prng(tmp_path):
  """The library makes its keys with its own PRNG (build.key), so a model built and saved
  in a process whose default is threefry restores with `moe_jax.restore` anywhere."""
  import runpy
  import moe_jax
  from moe_jax.models import build
  config = runpy.run_path(str(pathlib.Path(__file__).parents[1] / "configs" / "a2d2.py"))[
      "get_config"]("smoke")
  checkpoint.save_config(tmp_path, config.to_json_best_effort())
  with jax.default_prng_impl("threefry2x32"):
    baseline = build.baseline(config)
    with StageCheckpoints(tmp_path, "baseline", save_every=1) as ckpt:
      ckpt.save(0, {"model": nnx.state(baseline)}, finished=True)
  predictor = moe_jax.restore(tmp_path, stage="baseline", passes=2)
  out = predictor.predict(np.zeros((32, 48, 3), np.uint8), member_probs=False)
  assert out["segmentation"].shape == (1, 32, 48)
  restored = jax.tree.leaves(nnx.state(predictor._model, nnx.RngKey))
  assert restored and all(jax.random.key_impl(k) == jax.random.key_impl(build.key(0))
                          for k in restored)
