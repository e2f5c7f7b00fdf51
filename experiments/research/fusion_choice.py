"""Issue 14 must-show: how often the fit-time choice matched the test-set optimum.

Shipped PatchCore+ makes no discrete choice: each patch scores
`max(z_host, z_refined)`, robust z-scores from held-out support patches
(`calibration.statistics` + `calibration.fuse`). Per stored `fusion_study`
cell-seed (data x features x shots x seed) this compares, against the test-set
optimum between PatchCore (`host05`) alone and the refined score (`ref`) alone
(image AUROC; a difference of at most `--tie` points is a tie):

- the side the calibrated max takes in effect: the share of test images (and of
  normal test images) whose image score `max_j max(z_h, z_r)` comes from the
  refined half, and whether its majority side is the optimum;
- a discrete support-only choice, fixed before any agreement was computed
  (`fit_choice`): the refined score if its held-out normal quadrants reach a
  lower ceiling in their own robust units, i.e. mean over held-out quadrants of
  `(max_j x_j - median) / IQR` is smaller than the host's. The image score is a
  max over patches, so the scorer whose normal images peak less far above its
  own normal spread leaves more room for a defect; support patches only;
- the calibrated max against the oracle better-of-two per cell-seed.

    nice -n 10 python -m experiments.research.fusion_choice --cells_dir=runs/fusion_cells \
        --json_out=runs/fusion_choice.json
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from absl import app, flags

from experiments.research import fusion_analyse as fa
from experiments.research.fusion_report import SHIPPED
from protorefine_jax import calibration
from protorefine_jax.metrics import auroc

_CELLS = flags.DEFINE_string("cells_dir", "runs/fusion_cells", "Stored fusion_study cells.")
_JSON = flags.DEFINE_string("json_out", "runs/fusion_choice.json", "JSON summary written here.")
_TIE = flags.DEFINE_float("tie", 0.1, "AUROC points within which host and refined tie.")

HOST, REF = "host05", "ref"  # the shipped host (alpha 0.05) and the refined score


def image_sides(host: np.ndarray, ref: np.ndarray, cal: calibration.ScoreCalibration):
    """Per test image: the fused image score and whether the refined half supplies it.

    Args:
      host: `[T, m]` host patch scores.
      ref: `[T, m]` refined patch scores.
      cal: held-out support statistics.

    Returns:
      `(scores [T], from_refined [T] bool)`: `scores = max_j fuse(h, r)_j`
      (`calibration.fuse`, image score = max patch score); the refined half
      supplies it iff `max_j z_r > max_j z_h` (an exact tie counts as host).
    """
    scores = fa.image_scores(np.asarray(calibration.fuse(host, ref, cal), np.float64))
    zh, zr = (
        fa.image_scores(np.asarray(z, np.float64)) for z in calibration.standardise(host, ref, cal)
    )
    return scores, zr > zh


def refined_share(from_refined: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Share of all test images, and of normal (label 0) ones, scored by the refined half."""
    from_refined = np.asarray(from_refined, bool)
    normal = np.asarray(labels) == 0
    if from_refined.shape != normal.shape or not normal.any():
        raise ValueError(
            f"need one side per test image and at least one normal image, got "
            f"{from_refined.shape} sides for {normal.shape} labels ({normal.sum()} normal)."
        )
    return float(from_refined.mean()), float(from_refined[normal].mean())


def ceiling(z: np.ndarray) -> float:
    """Mean over held-out quadrants (rows) of `max_j z_j` (robust z-scores)."""
    return float(np.mean(np.asarray(z, np.float64).max(axis=-1)))


def fit_choice(held_host: np.ndarray, held_ref: np.ndarray) -> str:
    """Support-only discrete choice: the half with the lower held-out normal ceiling.

    Args:
      held_host: `[q, m']` host scores of the held-out support quadrants.
      held_ref: `[q, m']` refined scores of the same patches.

    Returns:
      `"ref"` iff the refined ceiling is strictly lower, else `"host"`.
    """
    cal = calibration.statistics(np.ravel(held_host), np.ravel(held_ref))
    ch, cr = map(ceiling, calibration.standardise(held_host, held_ref, cal))
    return "ref" if cr < ch else "host"


def optimum(auc_host: float, auc_ref: float, tie: float) -> str:
    """`"host"`, `"ref"`, or `"tie"` (|difference| <= tie)."""
    if abs(auc_host - auc_ref) <= tie:
        return "tie"
    return "host" if auc_host > auc_ref else "ref"


def analyse_cell(cell: dict, labels: np.ndarray, k: int, tie: float, report_rule=None) -> dict:
    """Every quantity of one cell-seed (held-out statistics: the shipped quadrants).

    `report_rule` (default `fusion_report.SHIPPED`): the offline rule RESULTS.md's
    "new PatchCore+" rows were computed with, scored alongside for comparison.
    """
    report_rule = report_rule or fa.make_rules()[SHIPPED]
    src = fa.cal_source(cell, "region", k)
    held_h, held_r = cell[f"{src}_{HOST}"], cell[f"{src}_{REF}"]
    cal = calibration.statistics(np.ravel(held_h), np.ravel(held_r))
    fused, from_ref = image_sides(cell[f"test_{HOST}"], cell[f"test_{REF}"], cal)
    share_all, share_normal = refined_share(from_ref, labels)
    a_h = auroc(labels, fa.image_scores(cell[f"test_{HOST}"]))
    a_r = auroc(labels, fa.image_scores(cell[f"test_{REF}"]))
    a_cal = auroc(labels, fused)
    a_report = auroc(labels, fa.image_scores(report_rule(cell, k)))
    choice = fit_choice(held_h, held_r)
    return {
        "auroc_host": a_h,
        "auroc_ref": a_r,
        "auroc_calibrated": a_cal,
        "auroc_report_rule": a_report,
        "optimum": optimum(a_h, a_r, tie),
        "share_refined_all": share_all,
        "share_refined_normal": share_normal,
        "majority_all": "ref" if share_all > 0.5 else "host",
        "majority_normal": "ref" if share_normal > 0.5 else "host",
        "fit_choice": choice,
        "auroc_fit_choice": a_r if choice == "ref" else a_h,
    }


def summarise(rows: list[dict]) -> dict:
    """Agreement counts and AUROC gaps over cell-seeds."""
    decisive = [r for r in rows if r["optimum"] != "tie"]
    oracle = np.array([max(r["auroc_host"], r["auroc_ref"]) for r in rows])

    def matches(key):
        return sum(r[key] == r["optimum"] for r in decisive)

    gap = np.array([r["auroc_calibrated"] for r in rows]) - oracle
    regret = np.array([r["auroc_fit_choice"] for r in rows]) - oracle
    return {
        "n": len(rows),
        "optimum_host": sum(r["optimum"] == "host" for r in rows),
        "optimum_ref": sum(r["optimum"] == "ref" for r in rows),
        "ties": len(rows) - len(decisive),
        "majority_all_match": matches("majority_all"),
        "majority_normal_match": matches("majority_normal"),
        "fit_choice_match": matches("fit_choice"),
        "fit_choice_ref": sum(r["fit_choice"] == "ref" for r in rows),
        "share_refined_all_mean": float(np.mean([r["share_refined_all"] for r in rows])),
        "share_refined_normal_mean": float(np.mean([r["share_refined_normal"] for r in rows])),
        "calibrated_minus_oracle_mean": float(gap.mean()),
        "calibrated_minus_oracle_worst": float(gap.min()),
        "fit_choice_minus_oracle_mean": float(regret.mean()),
        "fit_choice_minus_oracle_worst": float(regret.min()),
    }


def run(cells_dir: Path, tie: float) -> dict:
    """Per cell-seed rows and per-dataset / overall summaries."""
    cells = fa.load_cells(cells_dir)
    truths: dict = {}
    per: dict = {}
    groups: dict = defaultdict(list)
    report_rule = fa.make_rules()[SHIPPED]
    for (data, feat, k, seed), cell in sorted(cells.items()):
        if (data, feat) not in truths:
            truths[(data, feat)] = np.load(cells_dir / f"{data}_{feat}_truth.npz")["labels"]
        row = analyse_cell(cell, truths[(data, feat)], k, tie, report_rule)
        per[f"{data} {feat} k{k} s{seed}"] = row
        groups[data].append(row)
        groups["all"].append(row)
    return {"tie": tie, "cells": per, "summary": {g: summarise(r) for g, r in groups.items()}}


def table(summary: dict) -> str:
    """Markdown table of the summaries (datasets, then all)."""
    head = (
        "| data | cell-seeds | optimum host / ref / tie | max side = optimum (all imgs) "
        "| (normal imgs) | fit-time choice = optimum | refined share all / normal "
        "| calibrated - oracle mean / worst | fit-time choice - oracle mean / worst |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for g in [*sorted(k for k in summary if k != "all"), "all"]:
        s = summary[g]
        d = s["n"] - s["ties"]
        lines.append(
            f"| {g} | {s['n']} | {s['optimum_host']} / {s['optimum_ref']} / {s['ties']} "
            f"| {s['majority_all_match']}/{d} | {s['majority_normal_match']}/{d} "
            f"| {s['fit_choice_match']}/{d} (ref chosen {s['fit_choice_ref']}) "
            f"| {s['share_refined_all_mean']:.2f} / {s['share_refined_normal_mean']:.2f} "
            f"| {s['calibrated_minus_oracle_mean']:+.2f} / "
            f"{s['calibrated_minus_oracle_worst']:+.2f} "
            f"| {s['fit_choice_minus_oracle_mean']:+.2f} / "
            f"{s['fit_choice_minus_oracle_worst']:+.2f} |"
        )
    return "\n".join(lines)


def main(argv):
    """Prints the table and writes the JSON."""
    del argv
    res = run(Path(_CELLS.value), _TIE.value)
    print(table(res["summary"]))
    diff = [abs(r["auroc_calibrated"] - r["auroc_report_rule"]) for r in res["cells"].values()]
    print(
        f"\ncalibration.fuse (median/IQR) vs fusion_report's rule `{SHIPPED}`: "
        f"max |AUROC difference| {max(diff):.2f} over {len(diff)} cell-seeds."
    )
    out = Path(_JSON.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
