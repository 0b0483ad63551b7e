"""The report's "Bayesian routing" section: one row per router, and the thesis's three
claims (Li, arXiv 2509.23830) measured against the deterministic router of the same gate.

Reads only results.json (`evaluate.run`'s "routers", "splits", "ood" and
"routing_stability").
"""

from __future__ import annotations

STABILITY_SIGMA = 1e-2     # the thesis's single-noise stability figure
ACCURACY_BUDGET = 0.012    # "calibration up at ≤ 1.2 points of accuracy"


def _pct(value, digits: int = 1) -> str:
  return "–" if value is None else f"{100 * value:.{digits}f}"


def _get(tree, *keys):
  for key in keys:
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def _stability_at(results: dict, method: str, name: str, sigma: float = STABILITY_SIGMA):
  entry = results.get("routing_stability") or {}
  noise = entry.get("noise") or []
  values = _get(entry, "methods", method, name)
  if values is None or not noise:
    return None
  nearest = min(range(len(noise)), key=lambda i: abs(noise[i] - sigma))
  return values[nearest]


def _row_values(results: dict, method: str, split: str) -> dict:
  entry = _get(results, "splits", split, method) or {}
  ood = results.get("ood", {}).get(method, {})
  return {"miou": entry.get("miou"), "accuracy": entry.get("pixel_accuracy"),
          "nll": entry.get("nll"), "ece": _get(entry, "calibration", "max_softmax", "ece"),
          "mce": _get(entry, "calibration", "max_softmax", "mce"),
          "auroc_pe": _get(ood, "predictive_entropy", "auroc"),
          "auroc_rmi": _get(ood, "routing_mutual_information", "auroc"),
          "auroc_ge": _get(ood, "gate_entropy", "auroc"),
          "agreement": _stability_at(results, method, "top1_agreement"),
          "tv": _stability_at(results, method, "total_variation")}


def _better(ours, theirs, lower: bool) -> bool | None:
  if ours is None or theirs is None:
    return None
  return ours < theirs if lower else ours > theirs


def _verdict(flags: list[bool | None]) -> str:
  known = [f for f in flags if f is not None]
  return f"holds for {sum(known)} of {len(known)}" if known else "not measured"


def lines(results: dict) -> list[str]:
  """Markdown lines of the section ([] when the run has no stochastic router)."""
  gates = results.get("gates") or []
  trained_by_erm = {method: kind for method, kind in (results.get("routers") or {}).items()
                    if kind.get("objective", "erm") == "erm"}
  routers = dict(sorted(trained_by_erm.items(), key=lambda item: (
      gates.index(item[1]["gate"]) if item[1]["gate"] in gates else len(gates),
      item[1]["router"] != "deterministic", item[0])))
  if all(kind["router"] == "deterministic" for kind in routers.values()):
    return []
  split = (results.get("ood_splits") or [None])[0] or next(iter(results["splits"]))
  in_split, ood_split = results.get("ood_splits") or [None, None]
  out = ["## Bayesian routing", "",
         f"Each router around its gate type, on `{split}` (mIoU, pixel accuracy, NLL, "
         "max-softmax ECE/MCE, %), OOD AUROC "
         f"(`{in_split}` vs `{ood_split}` pixels, %) from the predictive entropy (PE), the "
         "routing mutual information (RMI) and the gate entropy (GE), and routing stability "
         f"at input noise σ = {STABILITY_SIGMA:g} × pixel std (top-1 expert agreement, "
         "total variation, %).", ""]
  header = ["method", "router", "mIoU", "acc", "NLL", "ECE", "MCE", "AUROC PE",
            "AUROC RMI", "AUROC GE", "top-1 agree", "TV"]
  out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  values = {method: _row_values(results, method, split) for method in routers}
  for method, kind in routers.items():
    v = values[method]
    out.append("| " + " | ".join([
        f"`{method}`", kind["router"], _pct(v["miou"]), _pct(v["accuracy"]),
        "–" if v["nll"] is None else f"{v['nll']:.3f}", _pct(v["ece"], 2), _pct(v["mce"], 2),
        _pct(v["auroc_pe"]), _pct(v["auroc_rmi"]), _pct(v["auroc_ge"]), _pct(v["agreement"]),
        "–" if v["tv"] is None else f"{100 * v['tv']:.2g}"]) + " |")
  stable, calibrated, detects, compared = [], [], [], []
  for method, kind in routers.items():
    base = next((m for m, k in routers.items()
                 if k["gate"] == kind["gate"] and k["router"] == "deterministic"), None)
    if kind["router"] == "deterministic" or base is None:
      continue
    ours, det = values[method], values[base]
    compared.append(f"`{method}` vs `{base}`")
    stable.append(_better(ours["tv"], det["tv"], lower=True))
    cost = (None if ours["accuracy"] is None or det["accuracy"] is None
            else det["accuracy"] - ours["accuracy"] <= ACCURACY_BUDGET)
    ece_better = _better(ours["ece"], det["ece"], lower=True)
    calibrated.append(None if cost is None or ece_better is None else cost and ece_better)
    best = lambda v, keys: max((v[k] for k in keys if v[k] is not None), default=None)
    detects.append(_better(best(ours, ("auroc_pe", "auroc_rmi", "auroc_ge")),
                           best(det, ("auroc_pe", "auroc_ge")), lower=False))
  if not compared:
    return out + [""]
  out += ["", "The thesis's claims, each Bayesian router against the deterministic router "
          "of its gate (" + ", ".join(compared) + "):", "",
          f"1. **Routing stability up** (lower TV at σ = {STABILITY_SIGMA:g}): "
          f"{_verdict(stable)}.",
          "2. **Calibration up at ≤ 1.2 points of accuracy** (lower max-softmax ECE, pixel "
          f"accuracy at most {100 * ACCURACY_BUDGET:.1f} points below): "
          f"{_verdict(calibrated)}.",
          "3. **OOD detection up** (the best of its PE, RMI and GE AUROC above the best of "
          f"the deterministic router's PE and GE AUROC): {_verdict(detects)}.", ""]
  return out
