"""The report's "Calibration under distribution shift" section (Wong et al., arXiv
2606.20544): the fitted temperatures, the accuracy–calibration trade-off of every method
and its soft/hard, tempered and robust variants, ECE by slice, the paper's hard-vs-soft
theorem and its robust-objective claim as measured, and conditional correctness at each
measure's own quantiles.

Reads only results.json (`evaluate.run`'s "splits", "variants", "routers",
"calibration", "corruptions").
"""

from __future__ import annotations

import numpy as np

from moe_jax.measures import MEASURES
from moe_jax.routing_report import _get, _pct

FIXED_THRESHOLD = 0.5   # the fixed threshold compared with the quantile thresholds


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
          *("| " + " | ".join(row) + " |" for row in rows)]


def _ece(entry: dict | None):
  return _get(entry, "calibration", "max_softmax", "ece")


def severity_ece(results: dict, method: str) -> list:
  """ECE of `method` at each corruption severity (mean over the corruptions; None where
  any is missing); [] without corruptions."""
  info = results.get("corruptions") or {}
  names, splits = info.get("names") or [], results["splits"]
  out = []
  for severity in info.get("severities") or []:
    values = [_ece(_get(splits, f"{info['split']}:{name}:{severity}", method)) for name in names]
    out.append(None if any(v is None for v in values) else float(np.mean(values)))
  return out


def compared_methods(results: dict, split: str) -> list[str]:
  """Every method but the single experts and their uniform ensemble, each followed by its
  evaluated variants."""
  present = results["splits"].get(split, {})
  variants = results.get("variants") or {}
  experts = {f"expert_{name}" for name in results.get("experts") or []}
  bases = [m for m in present if m not in variants and m not in experts and m != "ensemble"]
  return [m for base in bases for m in
          [base, *(v for v, kind in variants.items() if kind["of"] == base and v in present)]]


def tradeoff_rows(results: dict) -> tuple[list[str], list[list]]:
  """(header, rows of values) of the accuracy–calibration trade-off on the ID split, its
  hard subset, the OOD split and the corruptions."""
  in_split, ood_split = results.get("ood_splits") or [None, None]
  split = in_split or next(iter(results["splits"]))
  header = ["method", f"mIoU {split}", "ECE", "aECE", "NLL", "Brier", "hard-subset ECE",
            "hard-subset acc"]
  if ood_split:
    header += [f"mIoU {ood_split}", "ECE", "NLL"]
  severities = (results.get("corruptions") or {}).get("severities") or []
  if severities:
    header += ["corruption ECE (mean over severities)"]
  rows = []
  for method in compared_methods(results, split):
    entry = results["splits"][split][method]
    hard = entry.get("hard_subset") or {}
    row = [method, entry.get("miou"), _ece(entry),
           _get(entry, "calibration", "max_softmax", "adaptive_ece"), entry.get("nll"),
           entry.get("brier"), _ece(hard), hard.get("pixel_accuracy")]
    if ood_split:
      ood = _get(results, "splits", ood_split, method) or {}
      row += [ood.get("miou"), _ece(ood), ood.get("nll")]
    if severities:
      values = severity_ece(results, method)
      row += [None if not values or None in values else float(np.mean(values))]
    rows.append(row)
  return header, rows


def _cell(header: str, value) -> str:
  if value is None:
    return "–"
  if isinstance(value, str):
    return f"`{value}`"
  return f"{value:.3f}" if header in ("NLL", "Brier") else _pct(value)


def theorem_rows(results: dict) -> list[tuple[str, str, float | None, float | None]]:
  """(MoE, shifted split, soft-routed ECE, hard-routed ECE) of each MoE's MoCaE-tempered
  experts (falling back to the raw experts without a calibration) under the OOD split and
  each corruption severity."""
  in_split, ood_split = results.get("ood_splits") or [None, None]
  variants = results.get("variants") or {}
  rows = []
  for moe in results.get("routers") or {}:
    soft = f"{moe}_mocae" if _get(results, "splits", in_split, f"{moe}_mocae") else moe
    hard = f"{soft}_hard"
    if hard not in variants or _get(results, "splits", in_split, hard) is None:
      continue
    if ood_split:
      rows.append((soft, ood_split, _ece(_get(results, "splits", ood_split, soft)),
                   _ece(_get(results, "splits", ood_split, hard))))
    severities = (results.get("corruptions") or {}).get("severities") or []
    for severity, s, h in zip(severities, severity_ece(results, soft),
                              severity_ece(results, hard)):
      rows.append((soft, f"corruption severity {severity}", s, h))
  return rows


def _robust_claims(results: dict, split: str, ood_split: str | None) -> list[str]:
  """Robust objective vs ERM of the same gate: mIoU and ECE on the ID split, its hard
  subset and the OOD split."""
  routers = results.get("routers") or {}
  erm = {kind["gate"]: m for m, kind in routers.items()
         if kind["router"] == "deterministic" and kind.get("objective", "erm") == "erm"}
  out = []
  for method, kind in routers.items():
    objective = kind.get("objective", "erm")
    if objective == "erm" or kind["gate"] not in erm:
      continue
    base = erm[kind["gate"]]
    cells = []
    better = []
    for name, where in [(split, ("splits", split)), (f"{split} hard subset", None),
                        (ood_split, ("splits", ood_split))]:
      if name is None:
        continue
      if where is None:
        ours = _ece(_get(results, "splits", split, method, "hard_subset"))
        theirs = _ece(_get(results, "splits", split, base, "hard_subset"))
      else:
        ours, theirs = _ece(_get(results, *where, method)), _ece(_get(results, *where, base))
      if ours is not None and theirs is not None:
        better.append(ours < theirs)
        cells.append(f"{name}: ECE {_pct(ours)} vs {_pct(theirs)}")
    miou = (_get(results, "splits", split, method, "miou"),
            _get(results, "splits", split, base, "miou"))
    verdict = (f"lower ECE on {sum(better)} of {len(better)} slices" if better
               else "not measured")
    out.append(f"- `{method}` against `{base}` (ERM): {verdict}; "
               + "; ".join(cells) + f"; mIoU {_pct(miou[0])} vs {_pct(miou[1])}.")
  return out


def _quantile_rows(results: dict, split: str, method: str) -> list[list[str]]:
  entry = _get(results, "splits", split, method, "uncertainty") or {}
  thresholds = results.get("thresholds") or []
  if not thresholds:
    return []
  at = int(np.argmin(np.abs(np.asarray(thresholds) - FIXED_THRESHOLD)))
  rows = []
  for measure, values in entry.items():
    quantiles = values.get("at_quantiles")
    if not quantiles:
      continue
    row = [MEASURES[measure].short if measure in MEASURES else measure,
           f"{thresholds[at]:g}", _pct(values["p_uncertain_given_inaccurate"][at]),
           _pct(values["pavpu"][at])]
    for i, q in enumerate(quantiles["quantiles"]):
      row += [f"{quantiles['thresholds'][i]:.3f}",
              _pct(quantiles["p_uncertain_given_inaccurate"][i]),
              _pct(quantiles["pavpu"][i])]
    rows.append(row)
  return rows


def _region(results: dict) -> str:
  region = _get(results, "calibration", "settings", "expert_region")
  return {"domain": "its own domain's val pixels", "all": "every val pixel"}.get(
      region, "the val split")


def lines(results: dict) -> list[str]:
  """Markdown lines of the section ([] when the run has no variant to compare)."""
  in_split, ood_split = results.get("ood_splits") or [None, None]
  split = in_split or next(iter(results["splits"]))
  header, rows = tradeoff_rows(results)
  if not any(m in (results.get("variants") or {}) for m, *_ in rows):
    return []
  out = ["## Calibration under distribution shift", "",
         "Soft routing fuses the experts with the router's weights; `_hard` uses each unit's "
         "argmax expert alone; `_mocae` divides expert k's logits by its temperature T_k "
         f"(fitted on {_region(results)}) before the fusion; `_ts` is one temperature on the "
         "method's predictive "
         "distribution; `_robust` / `_robust_filtered` are gates trained by Wong et al.'s "
         "objectives. Temperatures are fitted on the val split (L-BFGS on log T)."]
  fitted = results.get("calibration")
  if fitted:
    out += ["", f"Temperatures (val NLL before → after, {fitted.get('pixels')} pixels of "
            f"`{fitted.get('val_split')}`): "
            + ", ".join(f"`{m}` {t:.2f}" for m, t in fitted["expert_temperatures"].items())
            + " (per expert, MoCaE); "
            + ", ".join(f"`{m}` {t:.2f} ({fitted['val_nll'][m]['before']:.3f} → "
                        f"{fitted['val_nll'][m]['after']:.3f})"
                        for m, t in fitted["aggregate"].items()) + "."]
    hard = fitted.get("hard_subset")
    if hard:
      out += ["", f"Hard subset: pixels where the experts' argmax classes disagree, or where "
              f"`{hard['moe']}`'s routing-weighted disagreement Σ_k r_k‖p_k − p̄‖² exceeds "
              f"{hard['disagreement_threshold']:.4f} (its top decile on the val split)."]
  out += ["", f"### Accuracy–calibration trade-off (%, NLL and Brier in nats and units; ID "
          f"`{split}`)", ""]
  out += _table(header, [[_cell(h, v) for h, v in zip(header, row)] for row in rows])
  theorem = theorem_rows(results)
  if theorem:
    holds = [h < s for _, _, s, h in theorem if s is not None and h is not None]
    out += ["", "### Hard vs soft routing under shift (the paper's theorem)", "",
            "With calibrated experts, hard routing stays calibrated under shifts that keep "
            "each expert's conditional label law, soft routing need not. Measured: ECE (%) "
            "of each MoE with MoCaE-tempered experts, soft against hard routing.", ""]
    out += _table(["MoE", "shift", "soft ECE", "hard ECE"],
                  [[f"`{m}`", s, _pct(a), _pct(b)] for m, s, a, b in theorem])
    out += ["", f"Hard routing has the lower ECE on {sum(holds)} of {len(holds)} shifted "
            "splits" + (" (the theorem's direction)." if holds and sum(holds) > len(holds) / 2
                        else "; the theorem's direction is not seen on this run.")]
  robust = _robust_claims(results, split, ood_split)
  if robust:
    out += ["", "### Robust gate objectives against ERM", "", *robust]
  gates = results.get("gates") or [None]
  first = next((m for m, kind in (results.get("routers") or {}).items()
                if kind["gate"] == gates[0] and kind["router"] == "deterministic"
                and kind.get("objective", "erm") == "erm"), None)
  quantile_rows = _quantile_rows(results, split, first) if first else []
  if quantile_rows:
    quantiles = _get(results, "splits", split, first, "uncertainty", "predictive_entropy",
                     "at_quantiles", "quantiles") or []
    header = ["measure", "fixed t", "p(u\\|i)", "PAvPU"]
    for q in quantiles:
      header += [f"t at q{q:g}", "p(u\\|i)", "PAvPU"]
    out += ["", f"### Conditional correctness at each measure's own quantiles (`{first}` on "
            f"`{split}`, %)", "",
            "A fixed threshold favours measures whose values reach it; at a measure's own "
            "quantile of uncertainty the measures are compared on equal footing.", ""]
    out += _table(header, quantile_rows)
  return out
