"""The throughput benchmark, run as a user runs it, on the Cityscapes smoke config with eight
experts (the training-step row's K) and MoE rows at K = 2 and 8."""

import json
from pathlib import Path
import subprocess
import sys

import pytest

REPO = Path(__file__).resolve().parents[1]
ROW_KEYS = {"method", "images_per_sec", "images_per_sec_min", "images_per_sec_max",
            "ms_per_batch", "gflops_per_image", "achieved_gflops", "fraction_of_peak",
            "compile_seconds"}


@pytest.mark.slow
@pytest.mark.long
def test_throughput_benchmark_writes_every_row_the_goals_and_a_table(tmp_path):
  out = tmp_path / "bench.json"
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.throughput",
       "--config=configs/cityscapes.py:smoke,experts=8",
       "--quick", "--experts=2,8", "--passes=10", "--routers=mfvr,der", "--samples=1,4",
       f"--out={out}",
       f"--cache={tmp_path / 'cache'}"],
      cwd=REPO, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  bench = json.loads(out.read_text())
  assert bench["peak_gflops"] > 0 and bench["batch_size"] == 4
  rows = bench["rows"]
  keys = [(r["method"], r.get("experts"), r.get("passes"), r.get("uncertainty"),
           r.get("stacked"), r.get("shared_encoder"), r.get("router"), r.get("samples"))
          for r in rows]
  assert keys == [("single", None, None, None, None, None, None, None)] + [
      ("moe", k, None, u, s, None, None, None) for k in (2, 8) for s in (True, False)
      for u in (False, True)] + [
      ("moe", 2, None, True, True, None, r, n) for r in ("mfvr", "der") for n in (1, 4)] + [
      ("ensemble", k, None, True, None, None, None, None) for k in (2, 8)] + [
      ("mc_dropout", None, t, True, None, s, None, None) for t in (10,) for s in (True, False)]
  for row in rows:
    assert ROW_KEYS <= set(row), row
    assert row["images_per_sec_min"] <= row["images_per_sec"] <= row["images_per_sec_max"]
    assert row["gflops_per_image"] > 0 and 0 < row["fraction_of_peak"]
  # More experts or passes cost more FLOPs per image; the maps are extra work.
  flops = {key if key[6] else key[:6]: row["gflops_per_image"]
           for key, row in zip(keys, rows)}
  assert flops[("moe", 8, None, False, True, None)] > flops[("moe", 2, None, False, True, None)]
  assert flops[("mc_dropout", None, 10, True, None, False)] > \
      flops[("mc_dropout", None, 10, True, None, True)]  # T full passes > shared encoder
  for router in ("mfvr", "der"):  # more routing samples are more work, on the same experts
    one, four = (flops[("moe", 2, None, True, True, None, router, n)] for n in (1, 4))
    assert one < four < 2 * one
  assert set(bench["goals"]) == {"mc_dropout_shared_vs_naive_T10", "stacked_vs_loop_K2",
                                 "cost_growth_K2_to_K8_over_linear",
                                 "uncertainty_maps_overhead_K2",
                                 "moe_K2_uncertainty_fraction_of_peak",
                                 "router_mfvr_S4_overhead_K2", "router_der_S4_overhead_K2"}
  assert all(isinstance(g["met"], bool) for g in bench["goals"].values())
  # Each goal's value is its ratio of the interleaved times it reports.
  maps_overhead = bench["goals"]["uncertainty_maps_overhead_K2"]
  ms = maps_overhead["ms_per_batch"]
  assert maps_overhead["value"] == pytest.approx(ms["maps"] / ms["bare"] - 1.0)
  assert bench["input_pipeline"]["images_per_sec"] > 0
  assert bench["training_step"]["images_per_sec"] > 0
  assert bench["training_step"]["experts"] == 8
  table = out.with_suffix(".md").read_text()
  assert table.count("\n| moe |") == 12 and "| goal | measured | target | met |" in table
  assert table in result.stdout
