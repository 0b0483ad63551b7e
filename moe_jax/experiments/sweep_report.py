"""The number-of-experts sweep's outputs: `sweep.json`, `sweep.png` and `sweep.md`.

`collect` reads each run's results.json into per-run summaries and, for every method and
metric, the mean and spread over seeds at each N; `write` writes the three files. Metrics,
all on the in-distribution test split (eval.ood_splits[0]) unless named OOD:
  miou                  mean IoU
  ece                   ECE of the max softmax ("max_softmax") and of each measure's
                        confidence 1 - u (the measure's name), 15 bins
  pavpu_area            PAvPU averaged over the threshold sweep, per measure
  p_uncertain_given_inaccurate   at the median of the measure's values (quantile 0.5)
  ood_auroc             AUROC of each measure separating the OOD split from the ID split
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moe_jax import checkpoint, evaluate, output_files
from moe_jax.measures import MEASURES
from moe_jax.report import _area, _pct, _routers, _table

SWEEP_FILE = "sweep.json"
FIGURE_FILE = "sweep.png"
REPORT_FILE = "sweep.md"
# The seed paper's measures: the claim and the figure are about these (a deterministic
# router's routing measures are 0 everywhere).
CLAIM_MEASURES = ("predictive_entropy", "mutual_information", "expert_variance",
                  "gate_entropy")
MEDIAN = 0.5


def _reference_methods(results: dict) -> list[str]:
  """The deterministic ERM MoE of each gate, the ensemble of the same experts, and MC
  dropout with the most passes."""
  kinds = _routers(results)
  moes = sorted((m for m, kind in kinds.items()
                 if kind["router"] == "deterministic" and kind.get("objective", "erm") == "erm"),
                key=lambda m: results["gates"].index(kinds[m]["gate"]))
  passes = [int(m.rsplit("_", 1)[1]) for m in results["ood"] if
            m.startswith("mc_dropout_") and m.rsplit("_", 1)[1].isdigit()]
  return moes + ["ensemble"] + ([f"mc_dropout_{max(passes)}"] if passes else [])


def run_summary(results: dict, in_split: str) -> dict:
  """{method: {metric: value or {measure: value}}} of one run (see the module docstring)."""
  summary = {}
  for method in _reference_methods(results):
    entry = results["splits"][in_split][method]
    measures = {name: values for name, values in entry["uncertainty"].items()}
    median = {name: values["at_quantiles"]["quantiles"].index(MEDIAN)
              for name, values in measures.items()}
    summary[method] = {
        "miou": entry["miou"],
        "ece": {"max_softmax": entry["calibration"]["max_softmax"]["ece"],
                **{name: values["ece"] for name, values in measures.items()}},
        "pavpu_area": {name: _area(values["pavpu"]) for name, values in measures.items()},
        "p_uncertain_given_inaccurate": {
            name: values["at_quantiles"]["p_uncertain_given_inaccurate"][median[name]]
            for name, values in measures.items()},
        "ood_auroc": {name: values["auroc"]
                      for name, values in results["ood"].get(method, {}).items()},
    }
  return summary


def _leaves(tree: dict, prefix: tuple = ()) -> dict[tuple, float | None]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_leaves(value, prefix + (key,)))
    else:
      flat[prefix + (key,)] = value
  return flat


def collect(runs: dict[tuple[int, int], Path]) -> dict:
  """Reads every run {(N, seed): run dir} and aggregates over seeds.

  Returns:
    {"experts": [N...], "seeds": [...], "in_split", "ood_split",
     "runs": {"<N>/<seed>": {"experts", "seed", "seconds", "summary"}},
     "aggregate": {"<method>/<metric>[/<measure>]": {"mean": [per N], "std": [per N],
                   "values": [[per seed] per N]}}}  (std over seeds, ddof 0; None where a
     value is undefined).
  """
  per_run, splits = {}, set()
  for (num_experts, seed), directory in sorted(runs.items()):
    results = json.loads((directory / evaluate.RESULTS_FILE).read_text())
    in_split, ood_split = checkpoint.load_config(directory)["eval"]["ood_splits"]
    splits.add((in_split, ood_split))
    marker = directory / "sweep_run.json"
    per_run[f"{num_experts}/{seed}"] = {
        "experts": num_experts, "seed": seed,
        "seconds": json.loads(marker.read_text()).get("seconds") if marker.is_file() else None,
        "summary": run_summary(results, in_split)}
  if len(splits) != 1:
    raise ValueError(f"the runs evaluate different ID/OOD splits: {sorted(splits)}")
  experts = sorted({n for n, _ in runs})
  seeds = sorted({s for _, s in runs})
  flat = {key: {"/".join(path): value for path, value in _leaves(run["summary"]).items()}
          for key, run in per_run.items()}
  aggregate = {}
  for key in dict.fromkeys(k for leaves in flat.values() for k in leaves):
    values = [[flat[f"{n}/{s}"].get(key) for s in seeds if f"{n}/{s}" in flat]
              for n in experts]
    defined = [[v for v in row if v is not None] for row in values]
    aggregate[key] = {
        "mean": [float(np.mean(row)) if row else None for row in defined],
        "std": [float(np.std(row)) if row else None for row in defined],
        "values": values}
  (in_split, ood_split), = splits
  return {"experts": experts, "seeds": seeds, "in_split": in_split, "ood_split": ood_split,
          "runs": per_run, "aggregate": aggregate}


def _spearman(x: list[float], y: list[float]) -> float | None:
  """Spearman's rank correlation (average ranks for ties); None if either is constant."""
  def ranks(values):
    values = np.asarray(values, float)
    order = values.argsort(kind="stable")
    rank = np.empty(len(values))
    rank[order] = np.arange(len(values))
    for v in np.unique(values):  # ties share their mean rank
      rank[values == v] = rank[values == v].mean()
    return rank
  rx, ry = ranks(x), ranks(y)
  if rx.std() == 0 or ry.std() == 0:
    return None
  return float(np.corrcoef(rx, ry)[0, 1])


def trend(sweep: dict, key: str, lower_is_better: bool = True) -> dict:
  """How a metric moves from the fewest to the most experts.

  Returns:
    {"first", "last" (means at min and max N), "first_std", "last_std", "spearman" (rank
    correlation of every run's value with N), "verdict": "better" / "worse" when the mean
    moves beyond the two ends' combined spread over seeds, else "no clear change"}; None
    if undefined.
  """
  entry = sweep["aggregate"].get(key)
  if entry is None or entry["mean"][0] is None or entry["mean"][-1] is None:
    return None
  pairs = [(n, v) for n, row in zip(sweep["experts"], entry["values"]) for v in row
           if v is not None]
  first, last = entry["mean"][0], entry["mean"][-1]
  spread = entry["std"][0] + entry["std"][-1]
  change = (first - last) if lower_is_better else (last - first)
  verdict = ("better" if change > spread else "worse" if -change > spread
             else "no clear change")
  return {"first": first, "last": last, "first_std": entry["std"][0],
          "last_std": entry["std"][-1], "spearman": _spearman(*zip(*pairs)),
          "verdict": verdict}


def _mean_std(sweep: dict, key: str, index: int) -> str:
  entry = sweep["aggregate"].get(key)
  if entry is None or entry["mean"][index] is None:
    return "–"
  std = f" ± {100 * entry['std'][index]:.1f}" if len(sweep["seeds"]) > 1 else ""
  return f"{100 * entry['mean'][index]:.1f}{std}"


def _main_moe(sweep: dict) -> str:
  first = next(iter(sweep["runs"].values()))["summary"]
  moes = [m for m in first if m.startswith("moe_")]
  return "moe_simple" if "moe_simple" in moes else moes[0]


def _measures(sweep: dict, method: str) -> list[str]:
  """The CLAIM_MEASURES that `method` has."""
  first = next(iter(sweep["runs"].values()))["summary"][method]
  return [m for m in CLAIM_MEASURES if m in first["ece"]]


def claim_lines(sweep: dict) -> list[str]:
  """The paper's third claim as measured: the MoE's ECE from the fewest to the most experts."""
  lines, tallies = [], []
  n0, n1 = sweep["experts"][0], sweep["experts"][-1]
  for moe in [m for m in next(iter(sweep["runs"].values()))["summary"] if m.startswith("moe_")]:
    verdicts = {}
    for name in ["max_softmax", *_measures(sweep, moe)]:
      result = trend(sweep, f"{moe}/ece/{name}")
      if result is not None:
        verdicts[name] = result
    better = [n for n, r in verdicts.items() if r["verdict"] == "better"]
    worse = [n for n, r in verdicts.items() if r["verdict"] == "worse"]
    head = verdicts.get("max_softmax")
    label = {"max_softmax": "max softmax",
             **{name: MEASURES[name].short for name in MEASURES}}
    if head is not None:
      rho = "–" if head["spearman"] is None else f"{head['spearman']:+.2f}"
      lines.append(
          f"- `{moe}`: max-softmax ECE {_pct(head['first'])} ± {_pct(head['first_std'])} % "
          f"at N = {n0} → {_pct(head['last'])} ± {_pct(head['last_std'])} % at N = {n1} "
          f"(Spearman ρ with N {rho}): **{head['verdict']}**.")
    lines.append(
        f"  Over the {len(verdicts)} confidences (max softmax and 1 − u of "
        f"{', '.join(MEASURES[m].short for m in _measures(sweep, moe))}), "
        f"calibration got better on {len(better)} "
        f"({', '.join(label[n] for n in better) or 'none'}), worse on {len(worse)} "
        f"({', '.join(label[n] for n in worse) or 'none'}), and moved less than the spread "
        f"over seeds on the rest.")
    tallies.append((len(better), len(worse)))
  better, worse = map(sum, zip(*tallies)) if tallies else (0, 0)
  verdict = ("supported" if better > worse else "contradicted" if worse > better
             else "not settled")
  return [f"**On this data the claim is {verdict}**: from N = {n0} to N = {n1} experts, "
          f"{better} of the MoEs' confidences became better calibrated and {worse} worse "
          "(beyond the spread over seeds).", "", *lines]


def table_lines(sweep: dict) -> list[str]:
  """One row per N: the main MoE's metrics, then the ensemble's and MC dropout's ECE."""
  moe = _main_moe(sweep)
  measures = _measures(sweep, moe)
  short = [MEASURES[m].short for m in measures]
  others = [m for m in next(iter(sweep["runs"].values()))["summary"] if m != moe]
  header = (["N", "mIoU", "ECE max softmax"] + [f"ECE {s}" for s in short] +
            ["PAvPU area PE", "p(u\\|i) PE"] + [f"AUROC {s}" for s in short] +
            [f"{m} ECE" for m in others])
  rows = []
  for i, n in enumerate(sweep["experts"]):
    rows.append([str(n), _mean_std(sweep, f"{moe}/miou", i),
                 _mean_std(sweep, f"{moe}/ece/max_softmax", i),
                 *(_mean_std(sweep, f"{moe}/ece/{m}", i) for m in measures),
                 _mean_std(sweep, f"{moe}/pavpu_area/predictive_entropy", i),
                 _mean_std(sweep, f"{moe}/p_uncertain_given_inaccurate/predictive_entropy", i),
                 *(_mean_std(sweep, f"{moe}/ood_auroc/{m}", i) for m in measures),
                 *(_mean_std(sweep, f"{m}/ece/max_softmax", i) for m in others)])
  return [f"`{moe}` on `{sweep['in_split']}` (OOD: `{sweep['ood_split']}`), in %, mean ± std "
          f"over seeds {', '.join(map(str, sweep['seeds']))}:", "", *_table(header, rows)]


def _plot(sweep: dict) -> bytes:
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  moe = _main_moe(sweep)
  measures = _measures(sweep, moe)
  methods = list(next(iter(sweep["runs"].values()))["summary"])
  colours = dict(zip(["max_softmax", *MEASURES], plt.get_cmap("tab10").colors))
  panels = [("mIoU", "miou", [None]), ("ECE of the max softmax", "ece", ["max_softmax"]),
            ("ECE of 1 − u", "ece", measures), ("PAvPU area", "pavpu_area", measures),
            ("p(uncertain | inaccurate) at the median", "p_uncertain_given_inaccurate",
             measures), ("OOD AUROC", "ood_auroc", measures)]
  fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), layout="constrained")
  x = np.asarray(sweep["experts"])
  for ax, (title, metric, names) in zip(axes.flat, panels):
    for method in methods:
      style = ({"linestyle": "-", "marker": "o"} if method.startswith("moe_")
               else {"linestyle": "--"} if method == "ensemble" else {"linestyle": ":"})
      for name in names:
        key = "/".join(filter(None, (method, metric, name)))
        entry = sweep["aggregate"].get(key)
        if entry is None or (method != moe and method.startswith("moe_") and len(names) > 1):
          continue
        mean = np.array([np.nan if v is None else v for v in entry["mean"]]) * 100
        std = np.array([np.nan if v is None else v for v in entry["std"]]) * 100
        colour = colours.get(name, None) if name else None
        label = f"{method}" + (f" {MEASURES[name].short}" if name in MEASURES else "")
        ax.errorbar(x, mean, yerr=std, color=colour, capsize=3, label=label, **style)
    ax.set(title=title, xlabel="number of experts N", ylabel="%", xticks=x)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
  fig.suptitle(f"{moe} and references against the number of experts (solid: MoE, dashed: "
               f"ensemble of the same experts, dotted: MC dropout; bars: std over "
               f"{len(sweep['seeds'])} seed(s))")
  png = output_files.figure_png(fig, dpi=100)
  plt.close(fig)
  return png


def write(workdir: Path, sweep: dict) -> list[Path]:
  """Writes sweep.json, sweep.png and sweep.md into `workdir` (each atomically)."""
  workdir = Path(workdir)
  seconds = [r["seconds"] for r in sweep["runs"].values() if r["seconds"] is not None]
  lines = ["# More experts: calibration against the number of experts N", "",
           "The seed paper's third claim: on Cityscapes, more experts give better-calibrated "
           "uncertainty. Measured here on this sweep's data "
           f"({len(sweep['experts'])} values of N × {len(sweep['seeds'])} seed(s); "
           f"{sum(seconds) / 60:.1f} min of runs).", "",
           "## The claim, as measured", "", *claim_lines(sweep), "",
           "A change counts only when the mean moves by more than the spread (std over seeds) "
           "at the two ends together.", "",
           "## Table", "", *table_lines(sweep), "",
           f"![metrics against N]({FIGURE_FILE})", ""]
  return [output_files.write_json(workdir / SWEEP_FILE, sweep),
          output_files.write_atomic(workdir / FIGURE_FILE, _plot(sweep)),
          output_files.write_atomic(workdir / REPORT_FILE, "\n".join(lines).encode())]
