"""The number-of-experts sweep's aggregation, trend verdicts and report, on fake runs."""

import json

import numpy as np
import pytest
from scipy import stats

from moe_jax.experiments import sweep_report

MEASURES = ("predictive_entropy", "mutual_information", "expert_variance", "gate_entropy")


def _uncertainty(rng, ece):
  return {"ece": ece, "pavpu": list(rng.random(5)),
          "at_quantiles": {"quantiles": [0.5, 0.9], "p_uncertain_given_inaccurate":
                           [float(rng.random()), 0.1]}}


def _fake_run(directory, rng, ece):
  """results.json and config.json of one run: the MoE's ECEs are `ece`, the rest random."""
  methods = {"moe_simple": MEASURES, "ensemble": MEASURES[:3], "mc_dropout_8": MEASURES[:3],
             "mc_dropout_2": MEASURES[:3], "baseline": MEASURES[:1]}
  split = {m: {"miou": float(rng.random()),
               "calibration": {"max_softmax": {"ece": ece if m == "moe_simple" else 0.05}},
               "uncertainty": {name: _uncertainty(rng, ece) for name in names}}
           for m, names in methods.items()}
  results = {"splits": {"test_id": split}, "gates": ["simple"],
             "routers": {"moe_simple": {"gate": "simple", "router": "deterministic",
                                        "objective": "erm"}},
             "ood": {m: {name: {"auroc": float(rng.random())} for name in names}
                     for m, names in methods.items()}}
  directory.mkdir(parents=True)
  (directory / "results.json").write_text(json.dumps(results))
  (directory / "config.json").write_text(json.dumps({"eval": {"ood_splits": ["test_id",
                                                                             "test_ood"]}}))
  (directory / "sweep_run.json").write_text(json.dumps({"seconds": 60.0}))
  return directory


@pytest.fixture
def sweep(tmp_path):
  """N = 2, 4, 8 x seeds 0, 1: the MoE's ECE is 0.10, 0.08, 0.05 (+-0.002 by seed)."""
  rng = np.random.default_rng(0)
  means = {2: 0.10, 4: 0.08, 8: 0.05}
  runs = {(n, s): _fake_run(tmp_path / f"experts{n}_seed{s}", rng, means[n] + (2 * s - 1) * 2e-3)
          for n in means for s in (0, 1)}
  return sweep_report.collect(runs)


def test_collect_means_and_spreads(sweep):
  entry = sweep["aggregate"]["moe_simple/ece/max_softmax"]
  np.testing.assert_allclose(entry["mean"], [0.10, 0.08, 0.05])
  np.testing.assert_allclose(entry["std"], [2e-3] * 3)  # ddof 0 of (m - d, m + d)
  np.testing.assert_allclose(entry["values"][2], [0.048, 0.052])
  assert sweep["experts"] == [2, 4, 8] and sweep["seeds"] == [0, 1]
  assert (sweep["in_split"], sweep["ood_split"]) == ("test_id", "test_ood")
  # The references: the ensemble and MC dropout with the most passes, not the baseline.
  assert set(sweep["runs"]["2/0"]["summary"]) == {"moe_simple", "ensemble", "mc_dropout_8"}
  assert "gate_entropy" in sweep["runs"]["2/0"]["summary"]["moe_simple"]["ood_auroc"]


def test_p_uncertain_given_inaccurate_is_read_at_the_median(sweep, tmp_path):
  results = json.loads((tmp_path / "experts4_seed1" / "results.json").read_text())
  expected = results["splits"]["test_id"]["moe_simple"]["uncertainty"]["mutual_information"][
      "at_quantiles"]["p_uncertain_given_inaccurate"][0]
  got = sweep["runs"]["4/1"]["summary"]["moe_simple"]["p_uncertain_given_inaccurate"]
  assert got["mutual_information"] == expected
  pavpu = results["splits"]["test_id"]["moe_simple"]["uncertainty"]["mutual_information"]["pavpu"]
  assert sweep["runs"]["4/1"]["summary"]["moe_simple"]["pavpu_area"]["mutual_information"] == (
      pytest.approx(np.mean(pavpu)))


def test_trend_against_scipy_and_the_spread_rule(sweep):
  result = sweep_report.trend(sweep, "moe_simple/ece/max_softmax")
  values = sweep["aggregate"]["moe_simple/ece/max_softmax"]["values"]
  n = [2, 2, 4, 4, 8, 8]
  assert result["spearman"] == pytest.approx(stats.spearmanr(n, sum(values, [])).statistic)
  assert result["verdict"] == "better"  # 0.10 -> 0.05, spread 0.004
  assert sweep_report.trend(sweep, "moe_simple/ece/max_softmax",
                            lower_is_better=False)["verdict"] == "worse"
  assert sweep_report.trend(sweep, "moe_simple/nothing") is None


def test_trend_within_the_spread_is_no_clear_change():
  sweep = {"experts": [2, 8], "aggregate": {"k": {
      "mean": [0.10, 0.097], "std": [0.002, 0.002], "values": [[0.098, 0.102], [0.095, 0.099]]}}}
  assert sweep_report.trend(sweep, "k")["verdict"] == "no clear change"


@pytest.mark.parametrize("x, y", [([1, 2, 3, 4], [4, 3, 2, 1]), ([1, 1, 2, 2, 3], [5, 3, 3, 1, 0]),
                                  ([2, 4, 8, 8], [0.3, 0.1, 0.2, 0.2])])
def test_spearman_with_ties_equals_scipy(x, y):
  assert sweep_report._spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)


def test_spearman_of_a_constant_is_undefined():
  assert sweep_report._spearman([1, 2, 3], [0.5, 0.5, 0.5]) is None


def test_write_states_the_claim_and_the_table(sweep, tmp_path):
  paths = sweep_report.write(tmp_path, sweep)
  assert [p.name for p in paths] == ["sweep.json", "sweep.png", "sweep.md"]
  report = (tmp_path / "sweep.md").read_text()
  assert "max-softmax ECE 10.0 ± 0.2 % at N = 2 → 5.0 ± 0.2 % at N = 8" in report
  assert "**better**" in report
  assert "**On this data the claim is supported**: from N = 2 to N = 8 experts, 5 of" in report
  # 5 confidences (max softmax, PE, MI, EV, GE), all falling by more than the spread.
  assert "calibration got better on 5 (max softmax, PE, MI, EV, GE), worse on 0" in report
  rows = [line for line in report.splitlines() if line.startswith("| 8 |")]
  assert len(rows) == 1 and rows[0].split(" | ")[2] == "5.0 ± 0.2"
  assert json.loads((tmp_path / "sweep.json").read_text())["experts"] == [2, 4, 8]
  assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_the_claim_is_contradicted_when_calibration_worsens_with_n(tmp_path):
  rng = np.random.default_rng(1)
  runs = {(n, s): _fake_run(tmp_path / f"experts{n}_seed{s}", rng, ece + s * 1e-3)
          for n, ece in ((2, 0.03), (8, 0.09)) for s in (0, 1)}
  lines = sweep_report.claim_lines(sweep_report.collect(runs))
  assert lines[0].startswith("**On this data the claim is contradicted**: from N = 2 to N = 8 "
                             "experts, 0 of the MoEs' confidences became better calibrated and "
                             "5 worse")
