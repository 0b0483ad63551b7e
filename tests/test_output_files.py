"""The run's output files: atomic writes under a full disk (a real failed write: a file-size
limit), damaged files read back, figures never half-written."""

import contextlib
import json
import resource
import zipfile

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from moe_jax import evaluate, output_files, plots, report


@contextlib.contextmanager
def file_size_limit(limit: int):
  """RLIMIT_FSIZE for this process (Python ignores SIGXFSZ: a write past it fails with
  EFBIG, as on a full disk); the soft limit only, restored on exit."""
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _figure() -> Figure:
  fig = Figure(figsize=(3, 2))
  fig.subplots().plot([0, 1], [1, 0])
  return fig


WRITERS = {
    "results.json": lambda path, n: evaluate.write_results(path.parent, {"n": "x" * n}),
    "histograms.npz": lambda path, n: output_files.write_arrays(path, {"a": np.arange(n)}),
    "figure.png": lambda path, n: plots._save(_figure(), path),
}


def test_written_arrays_read_back_exactly_with_np_load(tmp_path):
  arrays = {"all_test/moe_simple/detection/predictive_entropy": np.arange(12).reshape(2, 6),
            "all_test:fog:5/baseline/sums": np.array([1.5, -2.0, np.inf]),
            "empty": np.zeros((0, 3), np.int64)}
  output_files.write_arrays(tmp_path / "h.npz", arrays)
  with np.load(tmp_path / "h.npz", allow_pickle=False) as back:
    assert sorted(back.files) == sorted(arrays)
    for name, value in arrays.items():
      np.testing.assert_array_equal(back[name], value)
      assert back[name].dtype == value.dtype


@pytest.mark.parametrize("name", WRITERS)
def test_a_full_disk_keeps_the_previous_complete_file_and_says_what_to_do(tmp_path, name):
  path = tmp_path / name
  WRITERS[name](path, 10)
  before = path.read_bytes()
  with file_size_limit(len(before) // 2), pytest.raises(output_files.OutputError) as error:
    WRITERS[name](path, 100_000)
  message = str(error.value)
  assert message.startswith(f"could not write {path} (File too large); the previous "
                            f"{name} is intact. Free space on its disk"), message
  assert "rerun the same command" in message and "\n" not in message
  assert path.read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temp file left


def test_a_full_disk_on_a_first_write_leaves_nothing(tmp_path):
  with file_size_limit(10), pytest.raises(output_files.OutputError,
                                          match="nothing half-written was left"):
    evaluate.write_results(tmp_path, {"n": "x" * 100})
  assert list(tmp_path.iterdir()) == []


def test_a_temp_file_left_by_a_killed_write_is_removed_by_the_next_one(tmp_path):
  path = tmp_path / "reliability_all_test.png"
  half = tmp_path / ".reliability_all_test.png.k1ll3d.tmp"
  half.write_bytes(b"\x89PNG\r\n\x1a\n half")
  other = tmp_path / ".results.json.k1ll3d.tmp"  # another file's: not this write's to remove
  other.write_bytes(b"{")
  plots._save(_figure(), path)
  assert not half.exists() and other.exists()
  with Image.open(path) as image:
    image.verify()  # a complete PNG


def _truncate(path, keep: float) -> None:
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * keep)])


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.99])
def test_a_truncated_results_json_is_one_line_naming_it_and_the_fix(tmp_path, keep):
  path = evaluate.write_results(tmp_path, {"splits": {"a": [1.0, 2.0]}, "x": "y" * 50})
  _truncate(path, keep)
  with pytest.raises(output_files.OutputError) as error:
    output_files.read_json(path, rewritten_by="evaluate")
  message = str(error.value)
  assert message.startswith(f"{path} is damaged (JSONDecodeError: "), message
  assert message.endswith("rerun the 'evaluate' stage to rewrite it (--stages=evaluate,report "
                          "with the same --workdir)"), message


@pytest.mark.parametrize("keep", [0.0, 0.3, 0.9])
def test_a_truncated_npz_is_one_line_naming_it_when_opened(tmp_path, keep):
  path = output_files.write_arrays(tmp_path / "histograms.npz",
                                   {f"s/m/{i}": np.arange(1000) * i for i in range(5)})
  _truncate(path, keep)
  with pytest.raises(output_files.OutputError, match=r"histograms.npz is damaged .*rerun the "
                     r"'evaluate' stage"):
    output_files.read_arrays(path, rewritten_by="evaluate")


def test_a_garbled_array_is_one_line_naming_the_file_when_it_is_read(tmp_path):
  """A flipped byte inside one member: the archive opens, the damage shows when that array
  is looked up (the figures read the histograms lazily)."""
  path = output_files.write_arrays(tmp_path / "histograms.npz",
                                   {"good": np.zeros(10), "bad": np.arange(50_000)})
  with zipfile.ZipFile(path) as archive:
    info = archive.getinfo("bad.npy")
  data = bytearray(path.read_bytes())
  data[info.header_offset + 100] ^= 0xFF  # inside the deflated data of "bad.npy"
  path.write_bytes(bytes(data))
  with output_files.open_arrays(path, rewritten_by="evaluate") as arrays:
    np.testing.assert_array_equal(arrays["good"], np.zeros(10))
    with pytest.raises(output_files.OutputError, match="histograms.npz is damaged"):
      arrays["bad"]
    with pytest.raises(KeyError):  # a missing name stays a KeyError
      arrays["missing"]


def test_a_missing_npz_is_empty(tmp_path):
  assert output_files.read_arrays(tmp_path / "panels.npz", rewritten_by="evaluate") == {}


def test_report_on_a_truncated_results_json_names_it(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"data": {"test_splits": []}}))
  path = evaluate.write_results(tmp_path, {"splits": {}})
  _truncate(path, 0.5)
  with pytest.raises(output_files.OutputError, match=r"results.json is damaged"):
    report.write(tmp_path)
  assert not (tmp_path / "report.md").exists()
