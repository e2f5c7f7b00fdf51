"""Research: support statistics that see how new normal parts differ (RESULTS.md "Calibration").

Stage `score` stores, per dev cell (data x features x shots x seed), the host and
refined patch-score grids of every test image and of HELD-OUT SUPPORT units:

- `unit_*` `[k, 1 + V, m]`: each quadrant of each support image, and the same
  quadrant of `V` nuisance views of it (`threshold.augment_views`: small
  shift and rotation, gain and offset), against a bank of every other
  support patch (`calibration.held_out_units`, the shipped hold-outs);
- `cross_*` `[k, 1 + V, m]` (k >= 2): each whole support image and its views
  against a bank of the other `k - 1` images.

Stage `analyse` evaluates calibration rules on the stored grids: image AUROC
of the fused score against PatchCore, and the calibration error on the normal
test images (median of each half's z-scores, their IQR, and the share of
normal images whose score each half supplies).

    nice -n 5 python -m experiments.calibration_study --stage=score
    python -m experiments.calibration_study --stage=analyse
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import study_cells
from protorefine_jax import RefineConfig, build_bank, calibration, refine_and_score
from protorefine_jax.coreset import coreset_size
from protorefine_jax.data import load_dataset_category, sample_support
from protorefine_jax.metrics import auroc

study_cells.DATA.setdefault("ball_screw", ("folder", "bsdata", "ball_screw"))

_STAGE = flags.DEFINE_enum("stage", "score", ["score", "analyse"], "What to run.")
_DATA_ROOT = flags.DEFINE_string("data_root", "../shared/data", "Dev data root.")
_CACHE = flags.DEFINE_string("cache_dir", "runs/fusion_cache", "Feature cache (not committed).")
_OUT = flags.DEFINE_string("out_dir", "runs/calib_cells", "Stored cells.")
_DATA = flags.DEFINE_list("data", ["metal_plate", "bottle", "ball_screw"], "Dev sets.")
_FEATS = flags.DEFINE_list("features", ["lite0-simple", "lite2-simple"], "Feature sets.")
_SHOTS = flags.DEFINE_list("shots", ["1", "2", "4"], "Shot counts.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds.")
_VIEWS = flags.DEFINE_integer("views", 4, "Nuisance views per support image.")
_JSON = flags.DEFINE_string("json_out", "runs/calibration_study.json", "Analysis output.")

ALPHA = study_cells.ALPHA
GRID = (32, 32)


def view_features(data: str, feat: str, feats: dict, views: int, cache_dir: Path) -> dict:
    """`{image name: [V, m, c]}`: features of nuisance views of every cached support image."""
    path = cache_dir / f"{data}_{feat}_nuisance{views}.npz"
    names = sorted(feats["train"])
    if path.exists():
        z = np.load(path)
        if sorted(z["names"].tolist()) == names:
            return dict(zip(z["names"].tolist(), z["features"], strict=True))
    dataset, folder, category = study_cells.DATA[data]
    cat = load_dataset_category(
        dataset, Path(_DATA_ROOT.value) / folder, category, study_cells.IMAGE_SIZE
    )
    by_name = {study_cells.image_key(p): p for p in cat.train_good}
    det = study_cells.detector(feat)
    params = det.load_params(None)
    out = []
    for name in names:
        image = cat.load_images([by_name[name]])[0]
        # The views fit makes (seeded by the image's pixels).
        out.append(
            np.asarray(det.features(params, calibration.nuisance_views(image[None], views)[0]))
        )
    np.savez(path, names=np.array(names), features=np.stack(out))
    return dict(zip(names, out, strict=True))


def cross_units(sup, views, cfg, n_real):
    """`[k, 1 + V, m]` host/refined scores of each image and its views against the other images."""
    k, m, c = sup.shape
    run_cfg = calibration.ridge_in_force(n_real, c, cfg).replace(use_refinement=True)
    hosts, refs = [], []
    for i in range(k):
        bank = build_bank(jnp.asarray(np.delete(sup, i, axis=0)), ALPHA).prototypes
        q = np.concatenate([sup[i][None], views[i]])[None]
        h, r = calibration._host_and_refined(bank[None], jnp.asarray(q), run_cfg)
        hosts.append(np.asarray(h[0], np.float64))
        refs.append(np.asarray(r[0], np.float64))
    return np.stack(hosts), np.stack(refs)


def score_stage() -> None:
    """Computes and stores every missing cell."""
    shots = [int(k) for k in _SHOTS.value]
    cache = study_cells.FeatureCache(
        Path(_DATA_ROOT.value), Path(_CACHE.value), (0, 1, 2, 3, 4), max(4, *shots)
    )
    cache.cache_dir.mkdir(parents=True, exist_ok=True)
    out_dir = Path(_OUT.value)
    out_dir.mkdir(parents=True, exist_ok=True)
    for data in _DATA.value:
        for feat in _FEATS.value:
            feats = cache.get(data, feat)
            vf = view_features(data, feat, feats, _VIEWS.value, cache.cache_dir)
            np.savez(
                out_dir / f"{data}_{feat}_truth.npz", labels=feats["labels"], masks=feats["masks"]
            )
            test = jnp.asarray(feats["test"])
            for k in shots:
                if k > len(feats["pool"]):
                    print(f"{data}: {k} shots > {len(feats['pool'])} good images, skipped")
                    continue
                for seed in map(int, _SEEDS.value):
                    path = out_dir / f"{data}_{feat}_k{k}_s{seed}.npz"
                    res = dict(np.load(path)) if path.exists() else {}
                    if "full_host" in res:
                        continue
                    support = sample_support(feats["pool"], k, seed)
                    names = [study_cells.image_key(p) for p in support.paths]
                    sup = np.stack([feats["train"][n] for n in names])
                    views = np.stack([vf[n] for n in names])
                    cfg = RefineConfig(grid_shape=None, image_size=None)
                    bank = build_bank(jnp.asarray(sup), ALPHA).prototypes
                    t0 = time.time()
                    if "test_host" not in res:
                        host_cfg = cfg.replace(use_refinement=False)
                        res["test_host"] = np.asarray(
                            refine_and_score(bank, test, host_cfg).patch_scores
                        )
                        res["test_ref"] = np.asarray(refine_and_score(bank, test, cfg).patch_scores)
                    t1 = time.time()
                    if "unit_host" not in res:
                        res["unit_host"], res["unit_ref"] = calibration.held_out_units(
                            sup, ALPHA, cfg, GRID, views=views
                        )
                    t2 = time.time()
                    if k >= 2 and "cross_host" not in res:
                        n_real = coreset_size(k * sup.shape[1], ALPHA)
                        res["cross_host"], res["cross_ref"] = cross_units(sup, views, cfg, n_real)
                    t3 = time.time()
                    # Views of every support image against the real bank (all k originals).
                    flat_views = jnp.asarray(views.reshape(-1, *views.shape[2:]))
                    full_h = refine_and_score(bank, flat_views, cfg.replace(use_refinement=False))
                    full_r = refine_and_score(bank, flat_views, cfg)
                    res["full_host"] = np.asarray(full_h.patch_scores).reshape(views.shape[:3])
                    res["full_ref"] = np.asarray(full_r.patch_scores).reshape(views.shape[:3])
                    res["seconds"] = np.array([t1 - t0, t2 - t1, t3 - t2, time.time() - t3])
                    np.savez(path, **res)
                    print(
                        f"{path.name}: test {t1 - t0:.1f}s units {t2 - t1:.1f}s "
                        f"cross {t3 - t2:.1f}s full {time.time() - t3:.1f}s",
                        flush=True,
                    )


# ---------------------------------------------------------------- analysis


def loc_scale(x: np.ndarray) -> tuple[float, float]:
    """Median and IQR (the shipped `calibration.statistics`)."""
    s = calibration.statistics(np.ravel(x), np.ravel(x))
    return float(s.host_loc), float(s.host_scale)


def rule_stats(cell: dict, rule: str, k: int) -> tuple[float, float, float, float]:
    """(loc_h, scale_h, loc_r, scale_r) of a calibration rule."""
    uh, ur = cell["unit_host"], cell["unit_ref"]
    pick = {
        "quadrants": lambda a: a[:, :1],
        "views": lambda a: a[:, 1:],
        "quadrants+views": lambda a: a,
    }
    if rule == "fullviews":
        return (*loc_scale(cell["full_host"]), *loc_scale(cell["full_ref"]))
    if rule == "fullviews+quadrants":
        h = np.concatenate([cell["full_host"].ravel(), uh[:, 0].ravel()])
        r = np.concatenate([cell["full_ref"].ravel(), ur[:, 0].ravel()])
        return (*loc_scale(h), *loc_scale(r))
    if rule in pick:
        h, r = pick[rule](uh), pick[rule](ur)
    elif rule.startswith("cross"):
        if k < 2:
            at_one = {"cross": "quadrants", "cross+quadrants": "quadrants"}
            return rule_stats(cell, at_one.get(rule, "quadrants+views"), k)
        ch, cr = cell["cross_host"], cell["cross_ref"]
        if rule == "cross":
            h, r = ch[:, :1], cr[:, :1]
        elif rule == "cross+quadrants":
            h, r = np.concatenate([ch[:, :1], uh[:, :1]]), np.concatenate([cr[:, :1], ur[:, :1]])
        elif rule == "cross+views":  # every unit: both hold-outs, originals and views
            h, r = np.concatenate([ch, uh]), np.concatenate([cr, ur])
        else:
            raise KeyError(rule)
    else:
        raise KeyError(rule)
    return (*loc_scale(h), *loc_scale(r))


RULES = (
    "quadrants",
    "views",
    "quadrants+views",
    "cross",
    "cross+quadrants",
    "cross+views",
    "fullviews",
    "fullviews+quadrants",
)


def analyse_cell(cell: dict, labels: np.ndarray, k: int, rule: str) -> dict:
    """Image AUROC of the fused score and the calibration error on normal test images."""
    lh, sh, lr, sr = rule_stats(cell, rule, k)
    zh = (cell["test_host"] - lh) / sh
    zr = (cell["test_ref"] - lr) / sr
    fused = np.maximum(zh, zr).max(axis=1)
    normal = labels == 0
    q = lambda z: np.quantile(z[normal].ravel(), [0.25, 0.5, 0.75])
    h25, h50, h75 = q(zh)
    r25, r50, r75 = q(zr)
    from_ref = zr.max(axis=1) > zh.max(axis=1)
    return {
        "auroc": auroc(labels, fused),
        "host_shift": h50,
        "host_iqr": h75 - h25,
        "ref_shift": r50,
        "ref_iqr": r75 - r25,
        "ref_share_normal": float(np.mean(from_ref[normal])),
    }


def analyse(out_dir: Path) -> dict:
    """Every rule over every stored cell, and the per-cell summaries."""
    rows = []
    for path in sorted(out_dir.glob("*_k*_s*.npz")):
        data_feat, ks, ss = path.stem.rsplit("_", 2)
        data, feat = data_feat.rsplit("_", 1)
        labels = np.load(out_dir / f"{data}_{feat}_truth.npz")["labels"]
        cell = dict(np.load(path))
        k = int(ks[1:])
        base = {
            "data": data,
            "feat": feat,
            "k": k,
            "seed": int(ss[1:]),
            "host": auroc(labels, cell["test_host"].max(axis=1)),
            "refined": auroc(labels, cell["test_ref"].max(axis=1)),
        }
        for rule in RULES:
            rows.append({**base, "rule": rule, **analyse_cell(cell, labels, k, rule)})
    return {"rows": rows, "summary": summarise(rows)}


def summarise(rows: list[dict]) -> dict:
    """Per rule: worst and mean cell gain vs PatchCore, and the calibration error."""
    out = {}
    for rule in RULES:
        cells: dict = {}
        for r in rows:
            if r["rule"] == rule:
                cells.setdefault((r["data"], r["feat"], r["k"]), []).append(r)
        gains = [np.mean([r["auroc"] - r["host"] for r in v]) for v in cells.values()]
        err = lambda key, cells=cells: float(
            np.mean([abs(r[key]) for v in cells.values() for r in v])
        )
        out[rule] = {
            "cells": len(cells),
            "worst": float(np.min(gains)) if gains else None,
            "mean": float(np.mean(gains)) if gains else None,
            "abs_host_shift": err("host_shift"),
            "abs_ref_shift": err("ref_shift"),
            "host_iqr": float(np.mean([r["host_iqr"] for v in cells.values() for r in v])),
            "ref_iqr": float(np.mean([r["ref_iqr"] for v in cells.values() for r in v])),
            "ref_share_normal": float(
                np.mean([r["ref_share_normal"] for v in cells.values() for r in v])
            ),
        }
    return out


def main(argv):
    """Runs the requested stage."""
    del argv
    if _STAGE.value == "score":
        score_stage()
        return
    res = analyse(Path(_OUT.value))
    Path(_JSON.value).parent.mkdir(parents=True, exist_ok=True)
    Path(_JSON.value).write_text(json.dumps(res, indent=1))
    for rule, s in res["summary"].items():
        print(
            f"{rule:18s} "
            + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items())
        )


if __name__ == "__main__":
    app.run(main)
