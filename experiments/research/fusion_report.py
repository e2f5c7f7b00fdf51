"""Issue 14 tables from `fusion_study`'s stored grids (markdown on stdout).

python -m experiments.research.fusion_report --out_dir=runs/fusion_cells [--pixel]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from absl import app, flags

from experiments.research import fusion_analyse as fa

_OUT = flags.DEFINE_string("out_dir", "runs/fusion_cells", "Stored patch-score cells.")
_PIXEL = flags.DEFINE_bool("pixel", False, "Also pixel AUROC of the main rows (slow).")

SHIPPED = "medz host05+ref region"  # the new PatchCore+: (x - median) / IQR, calibration.fuse
MAIN = {
    "PatchCore (shipped, alpha 0.05)": "host05",
    "PatchCore alpha 1 (full bank)": "host1",
    "old PatchCore+ (refined only)": "ref",
    "new PatchCore+ (calibrated max)": SHIPPED,
}
ABLATIONS = {
    "W only (refined only)": "wonly",
    "new, mean/std from leave-one-image-out (k>=2)": "zmax host05+ref auto",
    "new with W only": "medz host05+wonly region",
    "max, scale (x-p25)/IQR (the report's earlier rule)": "qz0.25-0.75 host05+ref region",
    "new with host at alpha 1": "medz host1+ref region",
    "max, scale (x-mean)/std": "zmax host05+ref region",
    "max, scale (x-p50)/(p90-p50)": "qz0.5-0.9 host05+ref region",
    "max, scale (x-p50)/(p99-p50)": "qz0.5-0.99 host05+ref region",
    "max, scale x/p99": "maxq host05+ref region",
    "sum, x/std": "sum host05+ref /std region",
    "sum, x/mean": "sum host05+ref /mean region",
    "sum, unnormalised": "raw host05+ref",
    "geometric mean (scale-free)": "geo host05+ref",
}


def fmt(vals) -> str:
    """`mean ± std`."""
    return f"{np.mean(vals):.1f} ± {np.std(vals):.1f}" if len(vals) else "-"


def main(argv):
    """Prints the tables."""
    del argv
    rules_all = fa.make_rules()
    names = {**MAIN, **ABLATIONS}
    rules = {v: rules_all[v] for v in names.values()}
    pixel = tuple(MAIN.values()) if _PIXEL.value else ()
    res = fa.evaluate_rules(Path(_OUT.value), rules, pixel=pixel)
    cells = sorted(res)
    groups = sorted({(d, f) for d, f, _ in cells})
    for data, feat in groups:
        ks = sorted(k for d, f, k in cells if (d, f) == (data, feat))
        print(f"\n#### {data}, {feat} (image AUROC mean ± std over seeds; pixel AUROC mean)\n")
        print("| method | " + " | ".join(f"{k}-shot" for k in ks) + " |")
        print("|---|" + "---|" * len(ks))
        for label, rule in names.items():
            row = []
            for k in ks:
                r = res[(data, feat, k)][rule]
                s = fmt(r["image"])
                if r.get("pixel"):
                    s += f" / {np.mean(r['pixel']):.1f}"
                row.append(s + f" (n={len(r['image'])})" if len(r["image"]) < 5 else s)
            print(f"| {label} | " + " | ".join(row) + " |")
    print("\n#### Goal check over all cells (mean over seeds per cell)\n")
    print("| rule | vs | worst cell gain | mean gain | cells |")
    print("|---|---|---|---|---|")
    for label, rule in names.items():
        for ref in ("host05", "host1"):
            gains = {
                c: np.mean(res[c][rule]["image"]) - np.mean(res[c][ref]["image"]) for c in cells
            }
            worst = min(gains, key=gains.get)
            print(
                f"| {label} | {ref} | {gains[worst]:+.2f} ({worst[0]} {worst[1]} {worst[2]}-shot) "
                f"| {np.mean(list(gains.values())):+.2f} | {len(cells)} |"
            )
    if pixel:
        print("\n#### Pixel AUROC gain of the new PatchCore+\n")
        for ref in ("host05", "host1", "ref"):
            gains = {
                c: np.mean(res[c][SHIPPED]["pixel"]) - np.mean(res[c][ref]["pixel"]) for c in cells
            }
            worst = min(gains, key=gains.get)
            mean = np.mean(list(gains.values()))
            print(f"- vs {ref}: worst {gains[worst]:+.2f} ({worst}), mean {mean:+.2f}")
    # Per seed: is the new score at least as good as the better of host and refined?
    both = within = total = 0
    for c in cells:
        h, r, n = (np.array(res[c][x]["image"]) for x in ("host05", "ref", SHIPPED))
        total += len(n)
        both += int(np.sum(n >= np.maximum(h, r) - 1e-9))
        within += int(np.sum(n >= np.maximum(h, r) - 0.5))
    print(
        f"\nPer seed and cell ({total}): new >= max(host, refined) in {both}, "
        f"within 0.5 of it in {within}."
    )
    # Calibration cost: seconds of the region hold-out (seeds 1-4: compiled).
    print("\n#### Calibration cost (region hold-out, s per support set, median of seeds 1-4)\n")
    cellfiles = fa.load_cells(Path(_OUT.value))
    for data, feat in groups:
        row = []
        for k in sorted({k for d, f, k, _ in cellfiles if (d, f) == (data, feat)}):
            secs = [
                float(v["region_seconds"])
                for (d, f, kk, s), v in cellfiles.items()
                if (d, f, kk) == (data, feat, k) and s > 0
            ]
            row.append(f"{k}-shot {np.median(secs):.1f}" if secs else f"{k}-shot -")
        print(f"- {data} {feat}: " + ", ".join(row))


if __name__ == "__main__":
    app.run(main)
