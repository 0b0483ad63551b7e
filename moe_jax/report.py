"""Stage "report": `<workdir>/report.md` from `results.json` (tables a reader of the paper
expects, and the paper's claims as measured on this run's data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moe_jax import (calibration_report, checkpoint, evaluate, output_files, plots,
                     routing_report)
from moe_jax.measures import MEASURES
from moe_jax.plots import method_rank, primary

REPORT_FILE = "report.md"
OPERATING_POINT = 0.5


def _pct(value) -> str:
  return "–" if value is None else f"{100 * value:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
          *("| " + " | ".join(row) + " |" for row in rows)]


def _nearest(thresholds: list, t: float) -> int:
  """Index of the sweep's threshold nearest t (the reference sweep has 0.49 and 0.51)."""
  return int(np.argmin(np.abs(np.asarray(thresholds) - t)))


def _area(curve: list):
  """Mean over the threshold sweep (the area under the curve on [0, 1]); None if undefined."""
  values = [v for v in curve if v is not None]
  return float(np.mean(values)) if len(values) == len(curve) else None


def conditional_correctness_rows(split_results: dict, thresholds: list) -> list[list[str]]:
  at = _nearest(thresholds, OPERATING_POINT)
  rows = []
  for method in sorted(split_results, key=method_rank):
    entry = split_results[method]
    for measure in MEASURES:
      if measure not in entry.get("uncertainty", {}):
        continue
      values = entry["uncertainty"][measure]
      rows.append([method, MEASURES[measure].short] + [
          _pct(values[key][at])
          for key in ("p_accurate_given_certain", "p_uncertain_given_inaccurate", "pavpu")] +
          [_pct(_area(values["pavpu"])), _pct(values["per_image"]["pavpu"][at]),
           _pct(values["patch"]["pavpu"][at]) if "patch" in values else "–"])
  return rows


def _moe_methods(results: dict) -> list[str]:
  """The deterministic MoE of each gate type trained by ERM (the seed paper's)."""
  return [method for method, kind in _routers(results).items()
          if kind["router"] == "deterministic" and kind.get("objective", "erm") == "erm"]


def _routers(results: dict) -> dict[str, dict]:
  """{MoE method: {"gate", "router", "objective"}} (results before Bayesian routing: one
  deterministic MoE per gate; before gate objectives: no "objective", i.e. ERM)."""
  return results.get("routers") or {f"moe_{gate}": {"gate": gate, "router": "deterministic"}
                                    for gate in results["gates"]}


def claims(results: dict, in_split: str | None, ood_split: str | None) -> list[str]:
  """The paper's three claims, measured here (whichever way they go)."""
  lines = ["## The paper's claims, measured on this run's data", ""]
  split = results["splits"].get(ood_split or "", {})
  if "ensemble" in split:
    verdicts = []
    for moe in _moe_methods(results):
      for measure in ("predictive_entropy", "mutual_information", "expert_variance"):
        ours = _area(split[moe]["uncertainty"][measure]["pavpu"])
        ens = _area(split["ensemble"]["uncertainty"][measure]["pavpu"])
        if ours is not None and ens is not None:
          better = "higher" if ours > ens else "lower" if ours < ens else "equal"
          verdicts.append(f"`{moe}` {MEASURES[measure].short} {_pct(ours)} vs ensemble "
                          f"{_pct(ens)} ({better})")
    lines += [f"1. **MoE vs ensemble under OOD** (`{ood_split}`, PAvPU averaged over the "
              f"threshold sweep, %): " + "; ".join(verdicts) + "."]
  else:
    lines += ["1. **MoE vs ensemble under OOD**: not measured (no OOD split in this run)."]
  if {"moe_simple", "moe_classwise"} <= set(_moe_methods(results)):
    verdicts = []
    for name in dict.fromkeys(s for s in (in_split, ood_split) if s):
      ece = {gate: results["splits"][name][f"moe_{gate}"]["uncertainty"]["gate_entropy"]["ece"]
             for gate in ("simple", "classwise")}
      better = min(ece, key=lambda g: np.inf if ece[g] is None else ece[g])
      verdicts.append(f"`{name}`: simple {_pct(ece['simple'])} vs classwise "
                      f"{_pct(ece['classwise'])} ({better} better calibrated)")
    lines += ["2. **Simple vs classwise gate-entropy calibration** (ECE % of confidence "
              "1 − GE, lower is better): " + "; ".join(verdicts) + "."]
  else:
    lines += ["2. **Simple vs classwise gate-entropy calibration**: not measured in this run "
              f"(it trained the {', '.join(results['gates'])} gate only; set "
              "`--config.model.gates='(\"simple\",\"classwise\")'`)."]
  lines += ["3. **Calibration vs number of experts** (Cityscapes): one run has one N; the "
            "sweep `python -m moe_jax.experiments.num_experts --config "
            "configs/cityscapes.py:synthetic --workdir runs/experts_sweep` measures it "
            "(its `sweep.md`).", ""]
  return lines


def corruption_lines(results: dict) -> list[str]:
  """mIoU / max-softmax ECE (%) per method and severity, mean over the corruptions."""
  info = results.get("corruptions") or {}
  if not info.get("names"):
    return []
  splits = results["splits"]
  subset = (f"the first {info['frames_per_part']} frames of each part of"
            if info["frames_per_part"] else "all of")
  lines = ["", f"## Under corruption: {subset} `{info['split']}` (mIoU % / max-softmax ECE %, "
           f"mean over {len(info['names'])} corruptions: {', '.join(info['names'])})", ""]
  rows = []
  for method in sorted(primary(results, splits[info["clean"]]), key=method_rank):
    mious = evaluate.severity_means(results, method, lambda entry: entry["miou"])
    eces = evaluate.severity_means(
        results, method, lambda entry: entry["calibration"]["max_softmax"]["ece"])
    rows.append([method] + [f"{_pct(m)} / {_pct(e)}" for m, e in zip(mious, eces)])
  return lines + _table(["method", "clean"] + [f"severity {s}" for s in info["severities"]],
                        rows)


def write(workdir: str | Path) -> Path:
  """Writes `<workdir>/report.md` from `<workdir>/results.json`, and the figures it shows
  into `<workdir>/plots/`; returns the report's path."""
  workdir = Path(workdir)
  path = workdir / evaluate.RESULTS_FILE
  if not path.is_file():
    raise checkpoint.CheckpointError(f"no {path}; run the 'evaluate' stage first "
                                     "(--stages=evaluate) with the same --workdir")
  results = output_files.read_json(path, rewritten_by="evaluate")
  config = checkpoint.load_config(workdir)
  splits = [s for s in config["data"]["test_splits"] if s in results["splits"]]
  # The variants (hard, tempered, MoCaE) are in the calibration section's table only.
  methods = sorted(primary(results, dict.fromkeys(m for s in splits
                                                  for m in results["splits"][s])),
                   key=method_rank)
  thresholds = results["thresholds"]
  in_split, ood_split = results["ood_splits"] or [None, None]
  lines = [f"# Report: {workdir.name}", "",
           f"Data `{config['data']['name']}` at {tuple(config['data']['image_size'])}, "
           f"{config['model']['backbone']} ×{config['model']['width']} experts, "
           f"{' and '.join(results['gates'])} gates, MoE uncertainty from the "
           f"`{results['moe_members']}` sample set. Pixels pooled over each split; "
           "uncertainty normalised to [0, 1]; certain ⇔ u < t.", "",
           "## mIoU (%)", ""]
  lines += _table(["method"] + splits, [[m] + [_pct(results["splits"][s].get(m, {}).get("miou"))
                                               for s in splits] for m in methods])
  for split in [s for s in dict.fromkeys([in_split, ood_split, *splits[:1]]) if s]:
    used = thresholds[_nearest(thresholds, OPERATING_POINT)]
    lines += ["", f"## Conditional correctness on `{split}` (%, t = {used:g}; "
              "pooled over pixels; PAvPU area = mean over the sweep; per-image mean = the "
              "reference's averaging, equal to the pooled PAvPU when every image has as many "
              "labelled pixels; patches = Mukhoti & Gal's, accurate if ≥ 50% of its "
              "pixels are)", ""]
    lines += _table(["method", "measure", "p(accurate\\|certain)", "p(uncertain\\|inaccurate)",
                     "PAvPU", "PAvPU area", "PAvPU per-image mean", "PAvPU patches"],
                    conditional_correctness_rows(
                        {m: results["splits"][split][m]
                         for m in primary(results, results["splits"][split])}, thresholds))
    lines += ["", f"## Calibration on `{split}` (ECE %, 15 equal-width bins unless adaptive "
              "(equal-mass); confidence = 1 − u, or the max softmax)", ""]
    rows = []
    for method in sorted(primary(results, results["splits"][split]), key=method_rank):
      entry = results["splits"][split][method]
      if "calibration" in entry:
        softmax = entry["calibration"]["max_softmax"]
        rows.append([method, _pct(softmax["ece"]), _pct(softmax["adaptive_ece"])] +
                    [_pct(entry["uncertainty"].get(m, {}).get("ece")) for m in MEASURES] +
                    [f"{entry['brier']:.3f}", f"{entry['nll']:.3f}"])
    lines += _table(["method", "max softmax", "max softmax (adaptive)"]
                    + [m.short for m in MEASURES.values()] + ["Brier", "NLL"], rows)
  if results["ood"]:
    lines += ["", f"## OOD detection: `{in_split}` vs `{ood_split}` pixels (AUROC %, FPR at "
              "95% TPR %)", ""]
    lines += _table(["method"] + [f"{MEASURES[m].short} AUROC / FPR95" for m in MEASURES], [
        [method] + [f"{_pct(o[m]['auroc'])} / {_pct(o[m]['fpr_at_95_tpr'])}" if m in o else "–"
                    for m in MEASURES] for method, o in sorted(
                        ((m, o) for m, o in results["ood"].items()
                         if m in primary(results, results["ood"])),
                        key=lambda item: method_rank(item[0]))])
  lines += corruption_lines(results)
  lines += [""] + routing_report.lines(results)
  lines += [""] + calibration_report.lines(results)
  lines += [""] + claims(results, in_split, ood_split)
  figures = plots.write_all(workdir)
  if figures:
    lines += ["## Figures", "", *(f"![{path.stem}]({path.relative_to(workdir)})\n"
                                  for path in figures)]
  out = output_files.write_atomic(workdir / REPORT_FILE, ("\n".join(lines) + "\n").encode())
  print(f"report: {out}")
  return out
