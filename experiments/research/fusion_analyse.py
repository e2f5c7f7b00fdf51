"""Issue 14 research: fusion rules evaluated offline on `fusion_study`'s stored grids.

Every rule maps a cell's stored patch-score grids (and its support-only
calibration scores) to one `[T, m]` grid; the map and image score follow the
pipeline exactly (bilinear upsample + Gaussian blur via
`scoring.map_operators`; image score = max patch score, as `RefineOutput`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from protorefine_jax import calibration
from protorefine_jax.metrics import auroc
from protorefine_jax.scoring import map_operators

A, B = map_operators((32, 32), (256, 256), 4.0)
BASE = ("host05", "host1", "ref", "wonly")
STATS: dict[str, Callable[[np.ndarray], float]] = {
    "mean": lambda x: float(np.mean(x)),
    "median": lambda x: float(np.median(x)),
    "std": lambda x: float(np.std(x)),
    "p99": lambda x: float(np.quantile(x, 0.99)),
    "max": lambda x: float(np.max(x)),
}


def maps_of(grids: np.ndarray) -> np.ndarray:
    """`[T, m]` grids -> `[T, 256, 256]` maps (float32), as `scoring.anomaly_map`."""
    g = grids.reshape(-1, 32, 32).astype(np.float32)
    return np.einsum("hi,tij,wj->thw", A, g, B, optimize=True)


def image_scores(grids: np.ndarray) -> np.ndarray:
    """`max_j s_j` over the patch grid, as `pipeline.RefineOutput.image_scores`."""
    return grids.max(axis=1)


def cal_source(cell: dict, src: str, k: int) -> str:
    """Hold-out kind: `auto` = leave-one-image-out for k >= 2, quadrants at 1 shot."""
    if src == "auto":
        return "loo" if k >= 2 else "region"
    return src


def scale(cell: dict, scorer: str, stat: str, src: str, k: int) -> float:
    """Statistic `stat` of a scorer's held-out support scores (floored)."""
    s = cal_source(cell, src, k)
    x = np.asarray(cell[f"{s}_{scorer}"]).ravel()
    return max(STATS[stat](x), 1e-12)


def make_rules() -> dict[str, Callable[[dict, int], np.ndarray]]:
    """Rule name -> `rule(cell, k) -> [T, m]` fused test grid."""
    rules: dict[str, Callable[[dict, int], np.ndarray]] = {}
    for b in BASE:
        rules[b] = lambda cell, k, b=b: cell[f"test_{b}"]
    pairs = [("host05", "ref"), ("host1", "ref"), ("host1", "wonly"), ("host05", "wonly")]
    for a, b in pairs:
        for stat in STATS:
            for src in ("auto", "region"):

                def rule(cell, k, a=a, b=b, stat=stat, src=src):
                    sa, sb = scale(cell, a, stat, src, k), scale(cell, b, stat, src, k)
                    return cell[f"test_{a}"] / sa + cell[f"test_{b}"] / sb

                rules[f"sum {a}+{b} /{stat} {src}"] = rule

            # max of z-scores (offsets matter for max)
        for src in ("auto", "region"):

            def zmax(cell, k, a=a, b=b, src=src):
                s = cal_source(cell, src, k)
                xa, xb = np.ravel(cell[f"{s}_{a}"]), np.ravel(cell[f"{s}_{b}"])
                za = (cell[f"test_{a}"] - xa.mean()) / max(xa.std(), 1e-12)
                zb = (cell[f"test_{b}"] - xb.mean()) / max(xb.std(), 1e-12)
                return np.maximum(za, zb)

            rules[f"zmax {a}+{b} {src}"] = zmax

        # unnormalised sum and per-query median ratio (references)
        rules[f"raw {a}+{b}"] = lambda cell, k, a=a, b=b: cell[f"test_{a}"] + cell[f"test_{b}"]

        def qratio(cell, k, a=a, b=b):
            ga, gb = cell[f"test_{a}"], cell[f"test_{b}"]
            w = np.median(ga, axis=1, keepdims=True) / np.maximum(
                np.median(gb, axis=1, keepdims=True), 1e-12
            )
            return ga + w * gb

        rules[f"qmed {a}+{b}"] = qratio
        for wgt in (0.25, 0.5, 2.0, 4.0):
            for stat in ("mean", "std"):

                def wsum(cell, k, a=a, b=b, wgt=wgt, stat=stat):
                    sa, sb = scale(cell, a, stat, "region", k), scale(cell, b, stat, "region", k)
                    return cell[f"test_{a}"] / sa + wgt * cell[f"test_{b}"] / sb

                rules[f"w{wgt} {a}+{b} /{stat} region"] = wsum

        def maxq(cell, k, a=a, b=b):
            sa, sb = scale(cell, a, "p99", "region", k), scale(cell, b, "p99", "region", k)
            return np.maximum(cell[f"test_{a}"] / sa, cell[f"test_{b}"] / sb)

        rules[f"maxq {a}+{b} region"] = maxq
        for lo, hi in ((0.5, 0.9), (0.5, 0.99), (0.5, 0.999), (0.5, 1.0), (0.25, 0.75)):

            def qz(cell, k, a=a, b=b, lo=lo, hi=hi, src="region"):
                out = []
                for x in (a, b):
                    ref = np.ravel(cell[f"{cal_source(cell, src, k)}_{x}"])
                    ql, qh = np.quantile(ref, [lo, hi])
                    out.append((cell[f"test_{x}"] - ql) / max(qh - ql, 1e-12))
                return np.maximum(*out)

            rules[f"qz{lo}-{hi} {a}+{b} region"] = qz

        def medz(cell, k, a=a, b=b, src="region"):
            # The shipped rule itself: `calibration.statistics` and `calibration.fuse`.
            held = (np.ravel(cell[f"{cal_source(cell, src, k)}_{x}"]) for x in (a, b))
            cal = calibration.statistics(*held)
            return np.asarray(calibration.fuse(cell[f"test_{a}"], cell[f"test_{b}"], cal))

        rules[f"medz {a}+{b} region"] = medz
        rules[f"geo {a}+{b}"] = lambda cell, k, a=a, b=b: np.sqrt(
            np.maximum(cell[f"test_{a}"], 0) * np.maximum(cell[f"test_{b}"], 0)
        )
    for stat in ("z", "qz0.5-0.9", "qz0.25-0.75"):

        def z3(cell, k, stat=stat, parts=("host05", "host1", "ref")):
            out = []
            for x in parts:
                ref = np.ravel(cell[f"region_{x}"])
                if stat == "z":
                    lo, sc = ref.mean(), ref.std()
                else:
                    a, b = map(float, stat[2:].split("-"))
                    lo, hi = np.quantile(ref, [a, b])
                    sc = hi - lo
                out.append((cell[f"test_{x}"] - lo) / max(sc, 1e-12))
            return np.max(out, axis=0)

        rules[f"{stat}max3 host05+host1+ref region"] = z3
    return rules


def load_cells(out_dir: Path) -> dict[tuple[str, str, int, int], dict]:
    """Every stored cell, keyed `(data, features, shots, seed)`."""
    cells = {}
    for p in sorted(out_dir.glob("*_k*_s*.npz")):
        m = re.match(r"(.+?)_(lite\d-\w+)_k(\d+)_s(\d+)\.npz", p.name)
        data, feat, k, seed = m.group(1), m.group(2), int(m.group(3)), int(m.group(4))
        z = np.load(p)
        cells[(data, feat, k, seed)] = {key: z[key] for key in z.files}
    return cells


def evaluate_rules(
    out_dir: Path, rules: dict[str, Callable] | None = None, pixel: tuple[str, ...] = ()
) -> dict:
    """`{(data, feat, k): {rule: {"image": [per seed], "pixel": [per seed]}}}`."""
    rules = rules or make_rules()
    cells = load_cells(out_dir)
    truths = {}
    res: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for (data, feat, k, _seed), cell in sorted(cells.items()):
        if (data, feat) not in truths:
            z = np.load(out_dir / f"{data}_{feat}_truth.npz")
            truths[(data, feat)] = (z["labels"], z["masks"])
        labels, masks = truths[(data, feat)]
        for name, rule in rules.items():
            g = rule(cell, k)
            if name in pixel:
                maps = maps_of(g)
                res[(data, feat, k)][name]["image"].append(auroc(labels, image_scores(g)))
                res[(data, feat, k)][name]["pixel"].append(auroc(masks.ravel(), maps.ravel()))
            else:
                res[(data, feat, k)][name]["image"].append(auroc(labels, image_scores(g)))
    return res


def summary(res: dict, reference: str, metric: str = "image") -> list[tuple]:
    """Per rule: (mean gain, worst gain, worst cell) against `reference` over cells."""
    rows = []
    rules = next(iter(res.values())).keys()
    for rule in rules:
        gains = {
            cell: np.mean(r[rule][metric]) - np.mean(r[reference][metric])
            for cell, r in res.items()
            if r[rule].get(metric)
        }
        if not gains:
            continue
        worst = min(gains, key=gains.get)
        rows.append((rule, float(np.mean(list(gains.values()))), gains[worst], worst))
    return sorted(rows, key=lambda r: (-min(r[2], -0.5 + 1e-9), -r[1]))


def run(out_dir: Path) -> dict:
    """The 20 best rules against each host setting."""
    res = evaluate_rules(out_dir)
    return {"host05": summary(res, "host05")[:20], "host1": summary(res, "host1")[:20]}
