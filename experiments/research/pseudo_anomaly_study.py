"""Research: do pseudo-anomalies in the support images tell which half of PatchCore+ to trust?

RESULTS.md "Calibration that sees new parts", subsection "Pseudo-anomalies". The
calibrated PatchCore+ keeps the max of two robust z-scores (host and refined).
Which half separates defects better differs by data set, and the quadrant
statistics cannot say. This study pastes synthetic defects into the support
images (a flipped cut-and-paste rectangle, a thin scar of one colour, a
smooth dark or bright spot), scores each defective quadrant against the
shipped hold-out bank of its clean original (`calibration.held_out_units`
with the pseudo-anomalous images as its "views"), and asks, per dev
cell-seed, whether the half that separates the pasted patches better on the
support images is the half that separates the real test defects better.

Stage `score` stores, per cell of `calibration_study`, the hold-out scores of
`P` pseudo-anomalous copies of each support image and their patch masks;
stage `analyse` reads them beside `calibration_study`'s cells and prints the
agreement and the selection rules' image AUROC against PatchCore, as measured
and under `calibration_study.STRESS`.

    nice -n 5 python -m experiments.research.calibration_study --stage=score
    nice -n 5 python -m experiments.research.pseudo_anomaly_study --pseudo_stage=score
    python -m experiments.research.pseudo_anomaly_study --pseudo_stage=analyse
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from absl import app, flags
from scipy import stats as sps

from experiments.research import calibration_study as cs
from experiments.research import study_cells
from protorefine_jax import RefineConfig, calibration, pseudo_anomalies
from protorefine_jax.data import load_dataset_category
from protorefine_jax.metrics import auroc

_STAGE = flags.DEFINE_enum("pseudo_stage", "analyse", ["score", "cross", "analyse"], "What to run.")
_PSEUDO = flags.DEFINE_integer(
    "pseudo", calibration.PSEUDO_ANOMALIES, "Pseudo-anomalous copies per support image."
)
_PSEUDO_OUT = flags.DEFINE_string("pseudo_dir", "runs/pseudo_cells", "Stored pseudo cells.")
_SALT = flags.DEFINE_integer("pseudo_salt", 0, "XORed into each image's seed: another draw.")
_PSEUDO_JSON = flags.DEFINE_string("pseudo_json", "runs/pseudo_anomaly_study.json", "Output.")

MASK_SHARE = 0.2  # a patch is defective when the defect covers at least this share of it


def grid_masks(masks: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """`[n, H, W]` pixel masks -> `[n, gh * gw]` patch masks (row-major)."""
    n, h, w = masks.shape
    cells = masks.reshape(n, grid[0], h // grid[0], grid[1], w // grid[1]).mean(axis=(2, 4))
    return (cells >= MASK_SHARE).reshape(n, -1)


def pseudo_features(data: str, feat: str, names: list[str], count: int, cache_dir: Path):
    """`{name: ([P, m, c] features, [P, m] patch masks)}` of every cached support image."""
    path = cache_dir / f"{data}_{feat}_pseudo{count}_salt{_SALT.value}.npz"
    if path.exists():
        z = np.load(path)
        if sorted(z["names"].tolist()) == names:
            pairs = zip(z["features"], z["masks"], strict=True)
            return dict(zip(z["names"].tolist(), pairs, strict=True))
    dataset, folder, category = study_cells.DATA[data]
    cat = load_dataset_category(
        dataset, Path(cs._DATA_ROOT.value) / folder, category, study_cells.IMAGE_SIZE
    )
    by_name = {study_cells.image_key(p): p for p in cat.train_good}
    det = study_cells.detector(feat)
    params = det.load_params(None)
    feats, masks = [], []
    for name in names:
        image = cat.load_images([by_name[name]])[0]
        images, pixel_masks = (
            x[0] for x in pseudo_anomalies.support_pseudo_anomalies(image[None], count, _SALT.value)
        )
        feats.append(np.asarray(det.features(params, images)))
        masks.append(grid_masks(pixel_masks, cs.GRID))
    np.savez(path, names=np.array(names), features=np.stack(feats), masks=np.stack(masks))
    return dict(zip(names, zip(feats, masks, strict=True), strict=True))


def cell_support(feats: dict, pf: dict, k: int, seed: int):
    """`(names, [k, m, c] support features, [k, P, m, c] their pasted copies)` of a cell-seed."""
    names = cs.support_names(feats, k, seed)
    sup = np.stack([feats["train"][n] for n in names])
    return names, sup, np.stack([pf[n][0] for n in names])


def score_stage() -> None:
    """Hold-out scores of the pseudo-anomalous support copies, per stored cell."""
    cache = study_cells.FeatureCache(
        Path(cs._DATA_ROOT.value), Path(cs._CACHE.value), (0, 1, 2, 3, 4), 4
    )
    out = Path(_PSEUDO_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    order = np.concatenate(calibration.quadrant_rows(cs.GRID))  # held_out_units' patch order
    cfg = RefineConfig(grid_shape=None, image_size=None)
    for data in cs._DATA.value:
        for feat in cs._FEATS.value:
            feats = cache.get(data, feat)
            pf = pseudo_features(data, feat, sorted(feats["train"]), _PSEUDO.value, cache.cache_dir)
            for k in (int(s) for s in cs._SHOTS.value):
                for seed in map(int, cs._SEEDS.value):
                    path = out / f"{data}_{feat}_k{k}_s{seed}.npz"
                    if path.exists() or k > len(feats["pool"]):
                        continue
                    names, sup, pseudo = cell_support(feats, pf, k, seed)
                    host, ref = calibration.held_out_units(
                        sup, cs.ALPHA, cfg, cs.GRID, views=pseudo
                    )
                    masks = np.stack([pf[n][1] for n in names])[:, :, order]
                    np.savez(path, host=host[:, 1:], ref=ref[:, 1:], masks=masks)
                    print(path.name, flush=True)


def cross_stage() -> None:
    """Adds to each stored pseudo cell of k >= 2 its copies scored as new parts.

    `cross_host` / `cross_ref` `[k, P, m]`: each pasted copy of support image
    `i`, whole, against the coreset of the other `k - 1` images
    (`calibration_study.cross_units`, the cells' own cross-image units of the
    originals and views), patches in grid order.
    """
    cache = study_cells.FeatureCache(
        Path(cs._DATA_ROOT.value), Path(cs._CACHE.value), (0, 1, 2, 3, 4), 4
    )
    out = Path(_PSEUDO_OUT.value)
    cfg = RefineConfig(grid_shape=None, image_size=None)
    for data in cs._DATA.value:
        for feat in cs._FEATS.value:
            feats = cache.get(data, feat)
            pf = pseudo_features(data, feat, sorted(feats["train"]), _PSEUDO.value, cache.cache_dir)
            for k in (int(s) for s in cs._SHOTS.value if int(s) >= 2):
                for seed in map(int, cs._SEEDS.value):
                    path = out / f"{data}_{feat}_k{k}_s{seed}.npz"
                    if not path.exists():
                        continue
                    res = dict(np.load(path))
                    if "cross_host" in res:
                        continue
                    names, sup, pseudo = cell_support(feats, pf, k, seed)
                    n_real = cs.coreset_size(k * sup.shape[1], cs.ALPHA)
                    host, ref = cs.cross_units(sup, pseudo, cfg, n_real)
                    res["cross_host"], res["cross_ref"] = host[:, 1:], ref[:, 1:]
                    np.savez(path, **res)
                    print(path.name, "cross", flush=True)


HALVES = {"host": lambda h, r: h, "refined": lambda h, r: r, "shipped": np.maximum}


def probe(cell: dict, pseudo: dict) -> dict:
    """Pseudo-anomaly separation of each half on the support, in the shipped z units.

    `pixel`: AUROC of the pasted patches against every clean held-out patch
    (the originals' and nuisance views' quadrant hold-outs, and the pseudo
    copies' patches outside the defect); `image`: AUROC of the held-out
    units' max, pseudo copies against originals and views.
    """
    cal = calibration.statistics(cell["unit_host"][:, 0], cell["unit_ref"][:, 0])
    zc = calibration.standardise(cell["unit_host"], cell["unit_ref"], cal)
    zp = calibration.standardise(pseudo["host"], pseudo["ref"], cal)
    m = zc[0].shape[-1]
    clean = [np.asarray(z).reshape(-1, m) for z in zc]
    pasted = [np.asarray(z).reshape(-1, m) for z in zp]
    mask = pseudo["masks"].reshape(-1, m)
    keep = mask.any(axis=1)
    pasted, mask = [p[keep] for p in pasted], mask[keep]
    check = calibration.check_units(
        np.concatenate([cell["unit_host"], pseudo["host"]], axis=1),
        np.concatenate([cell["unit_ref"], pseudo["ref"]], axis=1),
        pseudo["host"].shape[1],
    )
    out = {
        "check_keep": check.keep,
        "check_fused_higher": float(check.fused_auroc) > float(check.host_auroc),
        "check_z": float(check.host_better_z),
    }
    # The same decision with the clean units and the copies scored as new parts
    # (whole, against the other images), in the shipped statistics `cal`.
    if "cross_host" in pseudo and "cross_host" in cell:
        cross = calibration.check_units(
            np.concatenate([cell["cross_host"], pseudo["cross_host"]], axis=1),
            np.concatenate([cell["cross_ref"], pseudo["cross_ref"]], axis=1),
            pseudo["cross_host"].shape[1],
            calibration=cal,
        )
        out["cross_keep"], out["cross_z"] = cross.keep, float(cross.host_better_z)
    else:
        out["cross_keep"], out["cross_z"] = check.keep, float(check.host_better_z)
    for name, f in HALVES.items():
        c, p = f(*clean), f(*pasted)
        neg = np.concatenate([c.ravel(), p[~mask]])
        out[f"pixel_{name}"] = auroc(
            np.r_[np.zeros(neg.size), np.ones(int(mask.sum()))], np.r_[neg, p[mask]]
        )
        out[f"image_{name}"] = auroc(
            np.r_[np.zeros(len(c)), np.ones(len(p))], np.r_[c.max(1), p.max(1)]
        )
    return out


RULES = {
    "fused always (before)": lambda pr: "shipped",
    "refinement check (shipped rule: drop if the host is significantly better)": lambda pr: (
        "shipped" if pr["check_keep"] else "host"
    ),
    "stricter: keep only if the fused AUROC is higher": lambda pr: (
        "shipped" if pr["check_fused_higher"] else "host"
    ),
    "cross check: copies and clean units as new parts (k >= 2; quadrant check at k = 1)": (
        lambda pr: "shipped" if pr["cross_keep"] else "host"
    ),
    "both checks must keep": lambda pr: (
        "shipped" if pr["check_keep"] and pr["cross_keep"] else "host"
    ),
    "host or shipped (pixel)": lambda pr: max(("host", "shipped"), key=lambda h: pr[f"pixel_{h}"]),
    "host, shipped or refined (pixel)": lambda pr: max(
        ("shipped", "host", "refined"), key=lambda h: pr[f"pixel_{h}"]
    ),
    "host or shipped (image)": lambda pr: max(("host", "shipped"), key=lambda h: pr[f"image_{h}"]),
}
"""Fit-time choices of the fused score from the probe (ties: the first listed)."""


def analyse_stage() -> dict:
    """Agreement of the probe with the test set, and the rules' gains against PatchCore."""
    rows = []
    for path in sorted(Path(_PSEUDO_OUT.value).glob("*_k*_s*.npz")):
        cell_path = Path(cs._OUT.value) / path.name
        if not cell_path.exists():
            continue
        data_feat, ks, ss = path.stem.rsplit("_", 2)
        labels = np.load(Path(cs._OUT.value) / f"{data_feat}_truth.npz")["labels"]
        cell, pseudo = dict(np.load(cell_path)), dict(np.load(path))
        pr = probe(cell, pseudo)
        cal = calibration.statistics(cell["unit_host"][:, 0], cell["unit_ref"][:, 0])
        for stress, ((hs, hw), (rs, rw)) in cs.STRESS.items():
            th = cs._distort(cell["test_host"], cal.host_loc, cal.host_scale, hs, hw)
            tr = cs._distort(cell["test_ref"], cal.refined_loc, cal.refined_scale, rs, rw)
            z = [np.asarray(a) for a in calibration.standardise(th, tr, cal)]
            test = {h: auroc(labels, f(*z).max(axis=1)) for h, f in HALVES.items()}
            rows.append(
                {"cell": data_feat + "_" + ks, "seed": ss, "stress": stress, **pr, "test": test}
            )
    out: dict = {"agreement": {}, "rules": {}}
    measured = [r for r in rows if r["stress"] == "as measured"]
    for kind in ("pixel", "image"):
        dx = np.array([r[f"{kind}_refined"] - r[f"{kind}_host"] for r in measured])
        dy = np.array([r["test"]["refined"] - r["test"]["host"] for r in measured])
        decisive = np.abs(dy) > 0.1  # AUROC points
        out["agreement"][kind] = {
            "cell_seeds": len(measured),
            "decisive": int(decisive.sum()),
            "same_sign": float(np.mean(np.sign(dx[decisive]) == np.sign(dy[decisive]))),
            "spearman": float(sps.spearmanr(dx, dy).correlation),
        }
    # Does each check's z (host better) predict the test set's host-minus-fused
    # AUROC? Over the cell-seeds where both checks ran (k >= 2).
    both = [r for r in measured if not r["cell"].endswith("_k1")]
    if len(both) > 2:
        dy = np.array([r["test"]["host"] - r["test"]["shipped"] for r in both])
        out["check_z_vs_test"] = {
            name: float(sps.spearmanr([r[key] for r in both], dy).correlation)
            for name, key in (("quadrant", "check_z"), ("cross", "cross_z"))
        }
        out["check_z_vs_test"]["cell_seeds"] = len(both)
        out["check_drops"] = {
            name: int(sum(not r[key] for r in measured))
            for name, key in (("quadrant", "check_keep"), ("cross", "cross_keep"))
        }
    for stress in cs.STRESS:
        for name, rule in RULES.items():
            cells: dict = {}
            for r in rows:
                if r["stress"] == stress:
                    gain = r["test"][rule(r)] - r["test"]["host"]
                    cells.setdefault(r["cell"], []).append(gain)
            gains = [float(np.mean(v)) for v in cells.values()]
            out["rules"].setdefault(stress, {})[name] = {
                "cells": len(gains),
                "worst": min(gains),
                "mean": float(np.mean(gains)),
            }
    out["per_cell"] = {}
    for r in measured:
        entry = out["per_cell"].setdefault(r["cell"], {})
        for key in ("pixel_host", "pixel_refined", "pixel_shipped"):
            entry.setdefault(key, []).append(r[key])
        for half in HALVES:
            entry.setdefault(f"test_{half}", []).append(r["test"][half])
    return out


def main(argv):
    """Runs the requested stage."""
    del argv
    if _STAGE.value == "score":
        score_stage()
        return
    if _STAGE.value == "cross":
        cross_stage()
        return
    res = analyse_stage()
    Path(_PSEUDO_JSON.value).parent.mkdir(parents=True, exist_ok=True)
    Path(_PSEUDO_JSON.value).write_text(json.dumps(res, indent=1))
    for kind, a in res["agreement"].items():
        print(
            f"{kind}: same sign as the test set in {a['same_sign']:.2f} of {a['decisive']} "
            f"decisive cell-seeds; Spearman {a['spearman']:+.2f}"
        )
    if "check_z_vs_test" in res:
        print("check z vs test host-minus-fused AUROC (Spearman):", res["check_z_vs_test"])
        print("refinement dropped in cell-seeds:", res["check_drops"])
    print("| rule | " + " | ".join(res["rules"]) + " |")
    print("|---|" + "---|" * len(res["rules"]))
    for name in RULES:
        cells = [
            f"{res['rules'][s][name]['worst']:+.2f} / {res['rules'][s][name]['mean']:+.2f}"
            for s in res["rules"]
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("| cell | pseudo pixel AUROC host / refined / fused | test AUROC (same) |")
    print("|---|---|---|")
    for cell, e in sorted(res["per_cell"].items()):
        ps = " / ".join(f"{np.mean(e[f'pixel_{h}']):.1f}" for h in ("host", "refined", "shipped"))
        ts = " / ".join(f"{np.mean(e[f'test_{h}']):.1f}" for h in HALVES)
        print(f"| {cell} | {ps} | {ts} |")


if __name__ == "__main__":
    app.run(main)
