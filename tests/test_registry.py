"""The dataset registry: one lookup for data.name, every entry's answers, and no TensorFlow
where only metadata is read (restoring a run and predicting included)."""

import json
from pathlib import Path
import runpy
import subprocess
import sys
import textwrap

import pytest

from data_pipelines import DataError, registry
from moe_jax import input_pipeline

REPO = Path(__file__).resolve().parents[1]
PROTOCOL = [name for name in vars(registry.Dataset) if not name.startswith("_")]


def config(name, arg=""):
  return runpy.run_path(str(REPO / "configs" / f"{name}.py"))["get_config"](arg)


def tensorflow_modules_after(code: str) -> list[str]:
  """The TensorFlow modules in sys.modules after `code` ran in a fresh interpreter."""
  code += textwrap.dedent("""
      import json, sys
      print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in
                              ("tensorflow", "tensorflow_datasets", "keras"))))
  """)
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["a2d2", "cityscapes"])
def test_every_entry_implements_the_protocol(name):
  entry = registry.get(name)
  assert [m for m in PROTOCOL if not callable(getattr(entry, m, None))] == []


@pytest.mark.parametrize("function, args, options", [
    ("prepare", (), {}), ("num_examples", ("highway_train",), {}),
    ("dataset", ("highway_train",), dict(batch_size=1, train=False, seed=0)),
    ("class_names", (), {}), ("expert_names", (), {}),
    ("expert_split", ("highway", "val"), {}), ("split_parts", ("all_test",), {})])
def test_unknown_dataset_name_is_one_error_naming_the_key_and_the_known_names(
    function, args, options, tmp_path):
  data = config("a2d2", "smoke").data
  data.name, data.data_dir = "kitti", str(tmp_path)
  with pytest.raises(DataError) as error:
    getattr(input_pipeline, function)(data, *args, **options)
  assert str(error.value) == ("config key data.name='kitti' is unknown; use one of: a2d2, "
                              "cityscapes.")


def test_a2d2_metadata():
  data = config("a2d2", "smoke").data
  assert len(input_pipeline.class_names(data)) == 38
  assert input_pipeline.expert_names(data) == ["highway", "urban"]
  assert input_pipeline.expert_split(data, "urban", "val") == "urban_val"
  assert input_pipeline.split_parts(data, "all_test") == ["highway_test", "urban_test"]
  assert input_pipeline.split_parts(data, "ambiguous_test") == ["ambiguous_test"]


def test_cityscapes_metadata():
  data = config("cityscapes", "4").data
  assert len(input_pipeline.class_names(data)) == 19
  assert input_pipeline.expert_names(data) == ["group0", "group1", "group2", "group3"]
  assert input_pipeline.expert_split(data, "group2", "train") == "group2_train"
  assert input_pipeline.expert_split(data, "group2", "val") == "validation"
  assert input_pipeline.split_parts(data, "validation") == ["validation"]
  with data.ignore_type():
    data.groups = (("aachen", "frankfurt"),)
  with pytest.raises(DataError, match="'frankfurt' is not a Cityscapes training city"):
    input_pipeline.expert_names(data)


def test_metadata_is_read_without_tensorflow():
  assert tensorflow_modules_after(textwrap.dedent("""
      import runpy
      from data_pipelines import a2d2_meta, cityscapes_meta, synthetic
      from moe_jax import input_pipeline
      for name, arg in (("a2d2", "smoke"), ("cityscapes", "4")):
        data = runpy.run_path(f"configs/{name}.py")["get_config"](arg).data
        for expert in input_pipeline.expert_names(data):
          input_pipeline.expert_split(data, expert, "val")
        input_pipeline.class_names(data)
        input_pipeline.split_parts(data, data.test_splits[0])
  """)) == []


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory):
  """A workdir as `moe_jax.main` leaves it after the experts stage of the smoke preset, with
  the experts at their initial weights (a restore reads only config.json and the stage)."""
  from flax import nnx
  from moe_jax import checkpoint
  from moe_jax.models import build
  smoke = config("a2d2", "smoke")
  workdir = tmp_path_factory.mktemp("untrained")
  checkpoint.save_config(workdir, smoke.to_json_best_effort())
  experts = build.experts(smoke, len(input_pipeline.expert_names(smoke.data)))
  with checkpoint.StageCheckpoints(workdir, "experts", save_every=1) as ckpt:
    ckpt.save(0, {"model": nnx.state(experts)}, finished=True)
  return workdir


@pytest.mark.slow
def test_restore_and_predict_never_import_tensorflow(untrained_run):
  assert tensorflow_modules_after(textwrap.dedent(f"""
      import numpy as np
      import moe_jax
      predictor = moe_jax.restore({str(untrained_run)!r}, stage="experts")
      out = predictor.predict(np.zeros((32, 48, 3), np.uint8))
      assert out["segmentation"].shape == (1, 32, 48) and len(predictor.class_names) == 38
  """)) == []
