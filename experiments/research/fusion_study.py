"""Issue 14 research harness: host / refined patch scores and support-only calibration.

Stage 1 (`--stage=score`): per dev cell (data x features x shots x seed) the
patch-score grids of every test image under the host (PatchCore at alpha 0.05
and at alpha 1, the full support bank), the shipped refinement and W only, plus
the same scores of HELD-OUT SUPPORT patches (no test image involved):

- `loo` (k >= 2): each support image scored against a bank of the other k - 1;
- `region` (every k): each quadrant of each support image scored against a
  bank of every other support patch (the only hold-out that exists at 1 shot).

The refinement of the held-out queries uses the ridge in force for the real
bank (`ridge_wide` iff the k-shot bank has n >= c), so calibration and test
see the same regime. Stage 2 (`--stage=analyse`) evaluates fusion rules on
the stored grids offline (maps and image scores exactly as the pipeline:
bilinear upsample + blur, image score = max of the map).

Run (CPU, about 25 min for 2 feature sets x 3 data x 3 shots x 5 seeds):

    nice -n 5 python -m experiments.research.fusion_study --stage=score
    python -m experiments.research.fusion_study --stage=analyse
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.research import study_cells
from protorefine_jax import RefineConfig, build_bank, refine_and_score
from protorefine_jax.app.batching import batched
from protorefine_jax.data import sample_support

study_cells.DATA.setdefault("ball_screw", ("folder", "bsdata", "ball_screw"))

_STAGE = flags.DEFINE_enum("stage", "score", ["score", "analyse"], "What to run.")
_DATA_ROOT = flags.DEFINE_string("data_root", "../shared/data", "Dev data root.")
_CACHE = flags.DEFINE_string("cache_dir", "runs/fusion_cache", "Feature cache (not committed).")
_OUT = flags.DEFINE_string("out_dir", "runs/fusion_cells", "Stored patch-score cells.")
_DATA = flags.DEFINE_list("data", ["metal_plate", "bottle", "ball_screw"], "Dev sets.")
_FEATS = flags.DEFINE_list("features", ["lite0-simple", "lite2-simple"], "Feature sets.")
_SHOTS = flags.DEFINE_list("shots", ["1", "2", "4"], "Shot counts.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds.")

ALPHA = 0.05
GRID = 32


def quadrant_masks(h: int = GRID, w: int = GRID) -> np.ndarray:
    """`[4, h*w]` bool: the four quadrants of the patch grid, row-major."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    q = (rows >= h // 2).astype(int) * 2 + (cols >= w // 2).astype(int)
    return np.stack([(q == i).ravel() for i in range(4)])


def _scores(bank, queries, cfg, batch=16):
    out = batched(lambda x: refine_and_score(bank, jnp.asarray(x), cfg), queries, batch)
    return out.patch_scores, out.diagnostics


def score_all(bank05, bank_full, queries, ref_cfg, batch=16):
    """Patch scores of `queries [B, m', c]` under the four base scorers."""
    host = ref_cfg.replace(use_refinement=False)
    h05, _ = _scores(bank05, queries, host, batch)
    h1, _ = _scores(bank_full, queries, host, batch)
    ref, diag = _scores(bank05, queries, ref_cfg, batch)
    wonly, _ = _scores(bank05, queries, ref_cfg.replace(use_transport=False), batch)
    return {
        "host05": h05,
        "host1": h1,
        "ref": ref,
        "wonly": wonly,
        "lsq": diag.lsq_residual,
        "wchg": diag.w_rel_change,
    }


def ridge_in_force(n: int, c: int, cfg: RefineConfig) -> RefineConfig:
    """`cfg` with both ridges set to the one the real bank (n rows) uses."""
    r = cfg.ridge_wide if n >= c else cfg.ridge
    return cfg.replace(ridge=r, ridge_wide=r)


def calibration(sup: np.ndarray, cfg: RefineConfig) -> dict[str, np.ndarray]:
    """Held-out support scores: `loo_*` (k >= 2) and `region_*` (every k)."""
    k, m, c = sup.shape
    out: dict[str, np.ndarray] = {}
    t0 = time.time()
    if k >= 2:
        parts = []
        for i in range(k):
            rest = np.delete(sup, i, axis=0)
            b05 = build_bank(jnp.asarray(rest), ALPHA).prototypes
            parts.append(score_all(b05, jnp.asarray(rest.reshape(-1, c)), sup[i : i + 1], cfg, 1))
        for key in parts[0]:
            out[f"loo_{key}"] = np.concatenate([p[key] for p in parts])
    out["loo_seconds"] = np.array(time.time() - t0)
    t0 = time.time()
    quads = quadrant_masks()
    flat = sup.reshape(-1, c)
    parts = []
    for i in range(k):
        for q in quads:
            keep = np.ones(k * m, bool)
            keep[i * m : (i + 1) * m] = ~q
            rest = flat[keep]
            b05 = build_bank(jnp.asarray(rest), ALPHA).prototypes
            query = sup[i][q][None]
            parts.append(score_all(b05, jnp.asarray(rest), query, cfg, 1))
    for key in parts[0]:
        out[f"region_{key}"] = np.concatenate([p[key] for p in parts])
    out["region_seconds"] = np.array(time.time() - t0)
    return out


def score_stage() -> None:
    """Computes and stores every missing cell."""
    cache = study_cells.FeatureCache(Path(_DATA_ROOT.value), Path(_CACHE.value), (0, 1, 2, 3, 4))
    cache.cache_dir.mkdir(parents=True, exist_ok=True)
    out_dir = Path(_OUT.value)
    out_dir.mkdir(parents=True, exist_ok=True)
    for data in _DATA.value:
        for feat in _FEATS.value:
            feats = cache.get(data, feat)
            test = feats["test"]
            np.savez(
                out_dir / f"{data}_{feat}_truth.npz", labels=feats["labels"], masks=feats["masks"]
            )
            for k in map(int, _SHOTS.value):
                for seed in map(int, _SEEDS.value):
                    path = out_dir / f"{data}_{feat}_k{k}_s{seed}.npz"
                    if path.exists():
                        continue
                    support = sample_support(feats["pool"], k, seed)
                    sup = np.stack(
                        [feats["train"][study_cells.image_key(p)] for p in support.paths]
                    )
                    c = sup.shape[-1]
                    bank = build_bank(jnp.asarray(sup), ALPHA)
                    n = bank.prototypes.shape[0]
                    base = RefineConfig(grid_shape=None, image_size=None)
                    cal_cfg = ridge_in_force(n, c, base)
                    t0 = time.time()
                    res = score_all(bank.prototypes, jnp.asarray(sup.reshape(-1, c)), test, base)
                    res = {f"test_{key}": v for key, v in res.items()}
                    res["test_seconds"] = np.array(time.time() - t0)
                    res.update(calibration(sup, cal_cfg))
                    np.savez(path, **res)
                    print(
                        f"{path.name}: test {float(res['test_seconds']):.1f}s "
                        f"loo {float(res['loo_seconds']):.1f}s "
                        f"region {float(res['region_seconds']):.1f}s",
                        flush=True,
                    )


def main(argv):
    """Runs the requested stage."""
    del argv
    if _STAGE.value == "score":
        score_stage()
    else:
        from experiments.research import fusion_analyse

        print(json.dumps(fusion_analyse.run(Path(_OUT.value)), indent=1)[:2000])


if __name__ == "__main__":
    app.run(main)
