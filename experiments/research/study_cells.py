"""Study stages 1-2: cached features and resumable result cells.

A cell's key is its full resolved computation (data, features, shots, seed,
alpha, every `RefineConfig` field, online settings), so cells are shared
between parts that need the same number and recomputed when a default moves.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from protorefine_jax import RefineConfig, calibration
from protorefine_jax import refine as refine_lib
from protorefine_jax.app import runner
from protorefine_jax.app.batching import BatchedDetector, score_features
from protorefine_jax.app.methods import METHODS, PAPER, REPRODUCTION, STUDY_MAIN
from protorefine_jax.bank import uses_wide_ridge
from protorefine_jax.coreset import coreset_size
from protorefine_jax.data import load_dataset_category, sample_support
from protorefine_jax.detectors import PatchCore, patchcore
from protorefine_jax.metrics import evaluate

PARTS = ("spec8", "sweeps", "ridge", "main", "optax")
SHOTS = (1, 2, 4)
DATA = {"metal_plate": ("mpdd", "mpdd", "metal_plate"), "bottle": ("mvtec", "mvtec", "bottle")}
IMAGE_SIZE = 256
# name -> (backbone, aggregation, pretrain_dim, target_dim)
FEATURES = {
    "lite0-official": ("efficientnet_lite0", "official", None, None),
    "lite0-simple": ("efficientnet_lite0", "simple", None, None),
    "lite2-official": ("efficientnet_lite2", "official", None, None),
    "lite2-simple": ("efficientnet_lite2", "simple", None, None),
    # SPEC 8's second table: the official pooling sized for WRN (values repeat on Lite0).
    "lite0-official1024": ("efficientnet_lite0", "official", 1024, 1024),
}
DEFAULT_FEATURES = "lite0-official"
ALPHA = patchcore.ALPHA  # the detector's default (sweeps vary it)
ONLINE = {"capacity": 128, "add_per_query": 16}


@functools.cache
def detector(feat: str) -> PatchCore:
    """The PatchCore detector of a feature set (its extractor sets `c` and the grid)."""
    backbone, agg, p_dim, t_dim = FEATURES[feat]
    return PatchCore.create(
        backbone,
        agg,
        IMAGE_SIZE,
        pretrain_dim=p_dim,
        target_dim=t_dim,
        allow_repetition=p_dim is not None,
    )


def methods() -> dict[str, tuple[dict[str, Any], bool]]:
    """Main-table label -> (RefineConfig fields, online), from `methods.METHODS`.

    Empty fields mean the shipped defaults (`full_config` fills them in).
    """
    return {
        label: (dict(METHODS[name].overrides), METHODS[name].online)
        for label, name in STUDY_MAIN.items()
    }


@dataclasses.dataclass(frozen=True)
class Cell:
    """One number-producing computation of the study."""

    part: str
    data: str
    features: str
    shots: int
    seed: int
    method: str
    config: tuple  # sorted RefineConfig field items
    alpha: float = ALPHA
    online: bool = False
    quick: bool = False

    def bank_rows(self) -> int:
        """Coreset size `n` of this cell's bank (`coreset_size`)."""
        grid = detector(self.features).extractor.grid
        return coreset_size(self.shots * grid[0] * grid[1], self.alpha)

    def key_config(self) -> dict[str, Any]:
        """The config as it acts: `ridge` is the ridge in force.

        Under the ridge rule (`bank.uses_wide_ridge`) only the ridge in force
        is part of the identity (cells computed before `ridge_wide` existed
        keep their keys). An online bank that crosses `n = c` while it fills
        keeps both.
        """
        cfg = dict(self.config)
        # Uncalibrated scores (and host scores, which calibration does not
        # touch) keep the keys they had before `calibrated` existed.
        if not cfg.get("calibrated", False) or not cfg.get("use_refinement", True):
            cfg.pop("calibrated", None)
        wide = cfg.pop("ridge_wide")
        c, low = detector(self.features).extractor.feature_dim, self.bank_rows()
        high = low + (ONLINE["capacity"] if self.online else 0)
        if uses_wide_ridge(low, c):
            cfg["ridge"] = wide
        elif uses_wide_ridge(high, c):
            cfg["ridge_wide"] = wide
        return cfg

    def key(self) -> str:
        """Identity of the computation (not of its label or part)."""
        # Quick (8-image) cells never pass for full ones.
        subset = {"test_subset": "quick"} if self.quick else {}
        return json.dumps(
            {
                **subset,
                "data": self.data,
                "features": self.features,
                "shots": self.shots,
                "seed": self.seed,
                "alpha": self.alpha,
                "config": self.key_config(),
                "online": ONLINE if self.online else None,
            },
            sort_keys=True,
        )

    def refine_config(self) -> RefineConfig:
        """The RefineConfig of this cell (maps at 256 px on the patch grid)."""
        return detector(self.features).config(**dict(self.config))


def full_config(fields: dict[str, Any]) -> tuple:
    """All RefineConfig fields (defaults filled in) as a hashable sorted tuple."""
    cfg = RefineConfig(**fields)
    skip = {"grid_shape", "image_size"}
    return tuple(
        sorted(
            (f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name not in skip
        )
    )


def plan(parts: Iterable[str], seeds: tuple[int, ...], quick: bool = False) -> list[Cell]:
    """Every cell the requested parts need, in a cache-friendly order."""
    cells: list[Cell] = []
    shots = (1,) if quick else SHOTS
    feats_all = ("lite0-official",) if quick else tuple(f for f in FEATURES if "1024" not in f)
    shipped: dict[str, Any] = {}  # the shipped defaults: `full_config` fills them in

    def add(part, data, feat, k, label, fields, online=False, alpha=ALPHA):
        for seed in seeds:
            cells.append(
                Cell(part, data, feat, k, seed, label, full_config(fields), alpha, online, quick)
            )

    for part in parts:
        if part == "spec8":
            for feat, labels in (
                ("lite0-simple", ("patchcore", "patchcore+", "W only")),
                ("lite0-official1024", ("patchcore", "patchcore+")),
            ):
                if quick and feat != "lite0-simple":
                    continue
                for k in shots:
                    for label in labels:
                        fields = {
                            "patchcore": {"use_refinement": False},
                            "patchcore+": REPRODUCTION,
                            "W only": {**REPRODUCTION, "use_transport": False},
                        }[label]
                        add("spec8", "metal_plate", feat, k, label, fields)
        elif part == "sweeps":
            base = shipped
            k = 1 if quick else 2
            grid = {
                "alpha": [0.01, 0.02, 0.05, 0.1, 0.2],
                "lam": [0.0, 0.1, 0.3, 1.0, 3.0, 10.0],
                "num_iters": [1, 2, 5, 10, 20],
                "epsilon": [0.01, 0.02, 0.05, 0.1, 0.2],
                "sinkhorn_iters": [3, 10, 30, 100],
                "ridge": [1e-4, 1e-3, 1e-2, 1e-1, 3e-1, 1.0],
            }
            if quick:
                grid = {"lam": [0.3, 1.0]}

            def sweep(label, fields, alpha=ALPHA, k=k):
                add("sweeps", "metal_plate", DEFAULT_FEATURES, k, label, fields, alpha=alpha)

            sweep("patchcore", {"use_refinement": False})
            for name, values in grid.items():
                for v in values:
                    if name == "alpha":
                        sweep(f"patchcore alpha={v}", {"use_refinement": False}, alpha=v)
                        sweep(f"alpha={v}", base, alpha=v)
                    elif name == "sinkhorn_iters":
                        for warm in (True, False):
                            fields = {**base, "sinkhorn_iters": v, "warm_start": warm}
                            sweep(f"sinkhorn_iters={v} warm={warm}", fields)
                        fields = {**base, "sinkhorn_iters": v, "sinkhorn_mode": "log"}
                        sweep(f"sinkhorn_iters={v} warm=True mode=log", fields)
                    else:
                        sweep(f"{name}={v}", {**base, name: v})
        elif part == "ridge":
            for data in DATA:
                for feat in ("lite0-simple", "lite0-official"):
                    if quick and feat != "lite0-official":
                        continue
                    for k in shots:
                        for r in (1e-4, 1e-2, 1e-1) if not quick else (1e-4,):
                            add(
                                "ridge",
                                data,
                                feat,
                                k,
                                f"patchcore+ ridge={r}",
                                {**PAPER, "ridge": r, "ridge_wide": r},
                            )
                            add(
                                "ridge",
                                data,
                                feat,
                                k,
                                f"W only ridge={r}",
                                {**PAPER, "ridge": r, "ridge_wide": r, "use_transport": False},
                            )
        elif part == "main":
            for data in DATA:
                for feat in feats_all:
                    for k in shots:
                        for label, (fields, online) in methods().items():
                            # The optax rows only check that the gradient M-step
                            # matches the closed form; they cost the most CPU time,
                            # so they run on the default features only.
                            if "optax" in label and feat != DEFAULT_FEATURES:
                                continue
                            add("main", data, feat, k, label, fields, online)
        elif part == "optax":
            pass  # computed separately by `optax_convergence`
        else:
            raise ValueError(f"unknown part {part!r}; known: {PARTS}")
    order = {f: i for i, f in enumerate(FEATURES)}
    return sorted(cells, key=lambda c: (c.data, order[c.features], c.shots, c.seed))


def image_key(path) -> str:
    """`train/good/<file>`: a support image's name, whatever the root's spelling."""
    return "/".join(Path(path).parts[-3:])


class FeatureCache:
    """Patch features per (data, features), extracted once and kept as .npz.

    Extraction is the eval's: the PatchCore detector in a `batching.BatchedDetector`, the
    test set through `runner.load_test_set`, the support images through
    `runner.SupportCache`; this class only keeps the result on disk.
    """

    def __init__(
        self,
        data_root: Path,
        cache_dir: Path,
        seeds: tuple[int, ...] = (0,),
        max_shots: int = 4,
    ):
        self.data_root, self.cache_dir, self.max_shots = data_root, cache_dir, max_shots
        # Every support image these seeds draw at any shot count (draws are
        # nested: the 4-shot set holds the 1- and 2-shot sets).
        self.seeds = tuple(range(max(10, max(seeds) + 1)))
        self.loaded: dict[tuple[str, str], dict[str, Any]] = {}

    def get(self, data: str, feat: str, quick: bool = False) -> dict[str, Any]:
        """`{train: {name: [m, c]}, test: [T, m, c], masks, labels, pool}`."""
        if (data, feat) in self.loaded:
            return self.loaded[(data, feat)]
        dataset, folder, category = DATA[data]
        path = self.cache_dir / f"{data}_{feat}{'_quick' if quick else ''}.npz"
        cat = load_dataset_category(dataset, self.data_root / folder, category, IMAGE_SIZE)
        det = detector(feat)
        shots = min(self.max_shots, len(cat.train_good))
        wanted = {
            p for seed in self.seeds for p in sample_support(cat.train_good, shots, seed).paths
        }
        cached = {}
        if path.exists():
            z = np.load(path)
            cached = {image_key(n): i for i, n in enumerate(z["train_names"].tolist())}
        if not path.exists() or any(image_key(p) not in cached for p in wanted):
            host = BatchedDetector(det, det.load_params(None), batch_size=8)
            names = sorted(wanted)
            if quick:
                cat = dataclasses.replace(cat, test=cat.test[:: max(1, len(cat.test) // 8)][:8])
            test = runner.load_test_set(cat, host)
            np.savez(
                path,
                train=np.asarray(runner.SupportCache(host, cat)(names)),
                train_names=np.array([image_key(p) for p in names]),
                test=np.asarray(test["features"]),
                masks=test["masks"],
                labels=test["labels"],
            )
        z = np.load(path)
        names = [image_key(n) for n in z["train_names"].tolist()]
        entry = {
            "train": dict(zip(names, z["train"], strict=True)),
            "test": z["test"],
            "masks": z["masks"],
            "labels": z["labels"],
            "pool": cat.train_good,
        }
        self.loaded = {(data, feat): entry}  # keep one feature set in memory
        return entry


class CellStore:
    """Cell results on disk: `{"meta": ..., "cells": {key: result}}`."""

    def __init__(self, path: Path):
        self.path = path
        raw = json.loads(path.read_text()) if path.exists() else {}
        self.meta: dict[str, Any] = raw.get("meta", {})
        self.cells: dict[str, dict[str, Any]] = raw.get("cells", {})

    def save(self) -> None:
        """Writes atomically (a crash never leaves half a file)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"meta": self.meta, "cells": self.cells}, indent=1))
        tmp.replace(self.path)

    def result(self, cell: Cell) -> dict[str, Any] | None:
        """The stored result of a cell, if any."""
        return self.cells.get(cell.key())


def compute(cell: Cell, feats: dict[str, Any]) -> dict[str, Any]:
    """Metrics, diagnostics and timing of one cell."""
    support = sample_support(feats["pool"], cell.shots, cell.seed)
    sup = np.stack([feats["train"][image_key(p)] for p in support.paths])
    det = detector(cell.features)
    cfg = cell.refine_config()
    # The calibration is the one of this cell's refinement settings.
    calibrate = cfg.use_refinement and cfg.calibrated
    state = det.fit_features(sup, alpha=cell.alpha, config=cfg, calibrate=calibrate)
    (bank,) = state.banks
    if bank.prototypes.shape[0] != cell.bank_rows():
        raise ValueError(
            f"{cell.features}: bank of {bank.prototypes.shape[0]} rows, but the cell key "
            f"assumes {cell.bank_rows()} (the cached features do not match the extractor)."
        )
    test = feats["test"]
    start = time.time()
    out = score_features(det, state, test, cfg, 16, ONLINE if cell.online else None)
    seconds = time.time() - start
    metrics = evaluate(feats["labels"], np.asarray(out.image_scores), feats["masks"], out.maps)
    diag = out.diagnostics
    return {
        **metrics,
        "marginal_error_max": float(np.max(diag.marginal_error)),
        "marginal_error_median": float(np.median(diag.marginal_error)),
        "lsq_residual_median": float(np.median(diag.lsq_residual)),
        "w_rel_change_median": float(np.median(diag.w_rel_change)),
        "bank_n": int(bank.prototypes.shape[0]),
        "bank_rank": bank.bank_rank,
        "feature_rank": bank.feature_rank,
        "degenerate": bool(bank.degenerate),
        "seconds": seconds,
        "support": list(support.names),
    }


def run_plan(
    cells: list[Cell], cache: FeatureCache, store: CellStore, parts: tuple[str, ...], quick: bool
) -> None:
    """Computes every missing cell (and the optax part if asked), saving as it goes."""
    cache.cache_dir.mkdir(parents=True, exist_ok=True)
    todo = [c for c in cells if store.result(c) is None]
    todo = list({c.key(): c for c in todo}.values())
    for i, cell in enumerate(tqdm(todo, desc="study cells", unit="cell")):
        feats = cache.get(cell.data, cell.features, quick)
        store.cells[cell.key()] = compute(cell, feats)
        if i % 10 == 9 or i == len(todo) - 1:
            store.save()
    if "optax" in parts:
        store.meta["optax"] = optax_convergence(cache, quick)
        store.save()


def optax_convergence(cache: FeatureCache, quick: bool) -> dict[str, Any]:
    """How many optax steps reach the closed-form M-step, plain and preconditioned.

    One M-step from `W0` with the same plan: relative Frobenius distance of
    the optax result to the closed form, median over query images.
    """
    feats = cache.get("metal_plate", DEFAULT_FEATURES, quick)
    support = sample_support(feats["pool"], 2, 0)
    sup = np.stack([feats["train"][image_key(p)] for p in support.paths])
    (bank,) = detector(DEFAULT_FEATURES).fit_features(sup, alpha=ALPHA).banks
    queries = feats["test"][:: max(1, len(feats["test"]) // 8)][:8]
    steps = (1, 10) if quick else (1, 3, 10, 30, 100, 300, 1000, 3000, 10000)
    out: dict[str, Any] = {"steps": list(steps), "queries": len(queries)}
    for ridge in (1e-4, RefineConfig().ridge):
        closed_cfg = RefineConfig(ridge=ridge, num_iters=1, image_size=None)

        @jax.jit
        def closed(q, cfg=closed_cfg):
            return refine_lib.refine(refine_lib.gram_system(bank.prototypes, q, cfg), cfg).w

        ref = [closed(jnp.asarray(q)) for q in queries]
        for opt in ("sgd", "preconditioned"):
            errs = []
            for s in steps:
                cfg = closed_cfg.replace(m_step="optax", optimizer=opt, inner_steps=s)
                fn = jax.jit(
                    lambda q, cfg=cfg: (
                        refine_lib.refine(refine_lib.gram_system(bank.prototypes, q, cfg), cfg).w
                    )
                )
                rel = [
                    float(jnp.linalg.norm(fn(jnp.asarray(q)) - r) / jnp.linalg.norm(r))
                    for q, r in zip(queries, ref, strict=True)
                ]
                errs.append(float(np.median(rel)))
            out[f"{opt} ridge={ridge:g}"] = errs
    return out


def support_names(feats: dict, k: int, seed: int, alike: bool = False) -> list[str]:
    """The cache keys of a cell-seed's `k` support images.

    `alike=False`: `sample_support`'s draw. `alike=True` (k >= 2): the draw's
    first image and its `k - 1` nearest cached pool images by the distance of
    their mean patch features, support images more alike than new parts are
    (the held-out rings' failure, on real images). The nearest are taken among
    the images `FeatureCache` holds (every image the seeds draw), not the
    whole pool.
    """
    names = [image_key(p) for p in sample_support(feats["pool"], k, seed).paths]
    if not alike or k == 1:
        return names
    pool = sorted(feats["train"])
    means = np.stack([feats["train"][n].mean(axis=0) for n in pool])
    anchor = means[pool.index(names[0])]
    order = np.argsort(np.sum((means - anchor) ** 2, axis=1), kind="stable")
    return [pool[i] for i in order[:k]]  # the anchor first (distance 0)


def context_units(sup, views, cfg: RefineConfig, alpha: float, grid: tuple[int, int]):
    """`[k, 1 + V, m]` refined scores of each held-out quadrant with its WHOLE image as the query.

    The banks are the shipped hold-outs' (every support patch outside the
    quadrant, `calibration.holdouts`); the query is the whole image (or view)
    the quadrant belongs to, all `m` patches as at deployment instead of the
    quadrant's `m / 4`; only the held-out quadrant's patches are kept, in
    `held_out_units`' order. The host half does not depend on the query.
    """
    k, m, c = sup.shape
    if grid[0] % 2 or grid[1] % 2:
        raise ValueError(f"context_units needs an even grid (equal quadrants), got {grid}.")
    banks, _ = calibration.holdouts(sup, alpha, grid, views)
    run_cfg = calibration._holdout_config(k * m, c, alpha, cfg)
    sources = np.concatenate([sup[:, None], views], axis=1)
    splits = calibration.holdout_splits(k, grid)
    queries = [sources[int(held[0]) // m] for _, held in splits]
    _, refs = calibration._host_and_refined(
        jnp.stack(banks), jnp.asarray(np.stack(queries)), run_cfg
    )
    refs = np.asarray(refs, np.float64)
    out = np.zeros((k, sources.shape[1], m))
    quarter = m // 4
    for j, (_, held) in enumerate(splits):  # quadrants of image i are splits 4i .. 4i + 3
        i, q = divmod(j, 4)
        out[i, :, q * quarter : (q + 1) * quarter] = refs[j][:, held - i * m]
    return out
