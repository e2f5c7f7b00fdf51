"""Study stages 1-2: cached features and resumable result cells.

A cell's key is its full resolved computation (data, features, shots, seed,
alpha, every `RefineConfig` field, online settings), so cells are shared
between parts that need the same number and recomputed when a default moves.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from experiments.hosts import score_features
from protorefine_jax import RefineConfig, build_bank
from protorefine_jax import refine as refine_lib
from protorefine_jax.coreset import coreset_size
from protorefine_jax.data import load_dataset_category, sample_support
from protorefine_jax.features import get_extractor
from protorefine_jax.metrics import evaluate

PARTS = ("spec8", "sweeps", "ridge", "main", "optax")
SHOTS = (1, 2, 4)
DATA = {"metal_plate": ("mpdd", "mpdd", "metal_plate"), "bottle": ("mvtec", "mvtec", "bottle")}
# name -> (backbone, aggregation, pretrain_dim, target_dim)
FEATURES = {
    "lite0-official": ("efficientnet_lite0", "official", None, None),
    "lite0-simple": ("efficientnet_lite0", "simple", None, None),
    "lite2-official": ("efficientnet_lite2", "official", None, None),
    "lite2-simple": ("efficientnet_lite2", "simple", None, None),
    # SPEC 8's second table: the official pooling sized for WRN (values repeat on Lite0).
    "lite0-official1024": ("efficientnet_lite0", "official", 1024, 1024),
}
# Feature dimension c of each set (checked against the cache in `compute`).
DIMS = {
    "lite0-official": 360,
    "lite0-simple": 152,
    "lite2-official": 432,
    "lite2-simple": 168,
    "lite0-official1024": 1024,
}
PATCHES = 32 * 32  # per image at 256 px, stride 8
DEFAULT_FEATURES = "lite0-official"
ALPHA = 0.05
ONLINE = {"capacity": 128, "add_per_query": 16}

# The paper's / SPEC's settings (SPEC 3, 6, 8) as explicit fields, so that the
# tables do not move when the shipped defaults do.
PAPER = dict(lam=0.3, epsilon=0.05, ridge=1e-4, ridge_wide=1e-4, num_iters=10, m_step="closed_form")
SPEC8 = dict(PAPER, sinkhorn_iters=100, warm_start=False, sinkhorn_mode="log")


def methods(shipped: dict[str, Any]) -> dict[str, tuple[dict[str, Any], bool]]:
    """Method label -> (RefineConfig fields, online) of the main table."""
    return {
        "patchcore": ({"use_refinement": False}, False),
        "patchcore+ (paper)": (PAPER, False),
        "patchcore+": (shipped, False),
        "W only": ({**shipped, "use_transport": False}, False),
        "W only (paper)": ({**PAPER, "use_transport": False}, False),
        "patchcore+ optax sgd": ({**shipped, "m_step": "optax", "optimizer": "sgd"}, False),
        "patchcore+ optax precond": (
            {**shipped, "m_step": "optax", "optimizer": "preconditioned"},
            False,
        ),
        "patchcore+ union": ({**shipped, "bank": "union"}, False),
        "online patchcore+": (shipped, True),
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
        return coreset_size(self.shots * PATCHES, self.alpha)

    def key_config(self) -> dict[str, Any]:
        """The config as it acts: `ridge` is the ridge in force.

        A bank uses `ridge_wide` while it has `n >= c` rows and `ridge`
        otherwise, so only the one in force is part of the identity (cells
        computed before `ridge_wide` existed keep their keys). An online bank
        that crosses `n = c` while it fills keeps both.
        """
        cfg = dict(self.config)
        wide = cfg.pop("ridge_wide")
        c, low = DIMS[self.features], self.bank_rows()
        high = low + (ONLINE["capacity"] if self.online else 0)
        if low >= c:
            cfg["ridge"] = wide
        elif high >= c:
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

    def refine_config(self, grid) -> RefineConfig:
        """The RefineConfig of this cell (maps at 256 px on the patch grid)."""
        return RefineConfig(grid_shape=grid, image_size=(256, 256), **dict(self.config))


def full_config(fields: dict[str, Any]) -> tuple:
    """All RefineConfig fields (defaults filled in) as a hashable sorted tuple."""
    cfg = RefineConfig(**fields)
    skip = {"grid_shape", "image_size"}
    return tuple(
        sorted(
            (f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name not in skip
        )
    )


def shipped_fields() -> dict[str, Any]:
    """The shipped defaults of RefineConfig (what `patchcore+` means today)."""
    return {}


def plan(parts: Iterable[str], seeds: tuple[int, ...], quick: bool = False) -> list[Cell]:
    """Every cell the requested parts need, in a cache-friendly order."""
    cells: list[Cell] = []
    shots = (1,) if quick else SHOTS
    feats_all = ("lite0-official",) if quick else tuple(f for f in FEATURES if "1024" not in f)
    shipped = shipped_fields()

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
                            "patchcore+": SPEC8,
                            "W only": {**SPEC8, "use_transport": False},
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
                        for label, (fields, online) in methods(shipped).items():
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
    """Patch features per (data, features), extracted once and kept as .npz."""

    def __init__(self, data_root: Path, cache_dir: Path, seeds: tuple[int, ...] = (0,)):
        self.data_root, self.cache_dir = data_root, cache_dir
        # Every support image these seeds draw at any shot count (draws are
        # nested: the 4-shot set holds the 1- and 2-shot sets).
        self.seeds = tuple(range(max(10, max(seeds) + 1)))
        self.loaded: dict[tuple[str, str], dict[str, Any]] = {}

    def get(self, data: str, feat: str, quick: bool = False) -> dict[str, Any]:
        """`{train: {name: [m, c]}, test: [T, m, c], masks, labels, grid}`."""
        if (data, feat) in self.loaded:
            return self.loaded[(data, feat)]
        dataset, folder, category = DATA[data]
        path = self.cache_dir / f"{data}_{feat}{'_quick' if quick else ''}.npz"
        cat = load_dataset_category(dataset, self.data_root / folder, category, 256)
        backbone, agg, p_dim, t_dim = FEATURES[feat]
        ex = get_extractor(backbone, agg, 256, p_dim, t_dim, allow_repetition=p_dim is not None)
        wanted = {p for seed in self.seeds for p in sample_support(cat.train_good, 4, seed).paths}
        cached = {}
        if path.exists():
            z = np.load(path)
            cached = {image_key(n): i for i, n in enumerate(z["train_names"].tolist())}
        if not path.exists() or any(image_key(p) not in cached for p in wanted):
            params = ex.load_params(None)
            names = sorted(wanted)
            test = cat.test[:: max(1, len(cat.test) // 8)][:8] if quick else cat.test

            def extract(paths):
                out = [
                    np.asarray(ex.extract(params, cat.load_images(paths[i : i + 8])))
                    for i in range(0, len(paths), 8)
                ]
                return np.concatenate(out)

            np.savez(
                path,
                train=extract(names),
                train_names=np.array([image_key(p) for p in names]),
                test=extract([t.path for t in test]),
                masks=cat.load_masks(test),
                labels=np.array([t.label for t in test], np.int32),
            )
        z = np.load(path)
        names = [image_key(n) for n in z["train_names"].tolist()]
        entry = {
            "train": dict(zip(names, z["train"], strict=True)),
            "test": z["test"],
            "masks": z["masks"],
            "labels": z["labels"],
            "grid": ex.grid,
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
    bank = build_bank(jnp.asarray(sup), cell.alpha)
    if bank.prototypes.shape != (cell.bank_rows(), DIMS[cell.features]):
        raise ValueError(
            f"{cell.features}: bank {bank.prototypes.shape}, but the cell key assumes "
            f"{(cell.bank_rows(), DIMS[cell.features])}; fix DIMS / PATCHES."
        )
    cfg = cell.refine_config(feats["grid"])
    test = feats["test"]
    start = time.time()
    out = score_features(bank.prototypes, test, cfg, 16, ONLINE if cell.online else None)
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
    bank = build_bank(jnp.asarray(sup), ALPHA)
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
