"""Issue 14: does the online calibrated PatchCore+ keep the offline one's guarantee?

Per cell (data, 2 shots, seed; the study's ring buffer `study_cells.ONLINE`,
stream order `hosts.stream_order`): the library's PatchCore, offline
PatchCore+ and online PatchCore+ (both calibrated, as shipped), and, for the
diagnosis, a copy of the online step that returns BOTH halves of the
calibrated score (host distance to the support bank, refined score) under the
old ridge rule (`n + capacity` rows: ridge_wide on 152-d features) and the
current one (the support bank's ridge), fused offline under the shipped
calibration and one measured under ridge_wide. The buffer dynamics do not
depend on the calibration, so one scan serves every fusion.

    nice -n 5 python -m experiments.research.online_diagnose --data=bottle,metal_plate,ball_screw \
        --seeds=0,1,2
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.research import study_cells
from protorefine_jax.app.batching import stream_order
from protorefine_jax.coreset import greedy_coreset_indices, projection_matrix
from protorefine_jax.data import sample_support
from protorefine_jax.gram import gram_system, matmul_precision
from protorefine_jax.metrics import auroc
from protorefine_jax.pipeline import OnlineState
from protorefine_jax.refine import refine
from protorefine_jax.scoring import base_patch_scores, refined_patch_scores

study_cells.DATA.setdefault("ball_screw", ("folder", "bsdata", "ball_screw"))

_DATA = flags.DEFINE_list("data", ["bottle"], "Dev sets.")
_FEAT = flags.DEFINE_string("features", "lite0-simple", "Feature set.")
_SHOTS = flags.DEFINE_integer("shots", 2, "Shot count.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds.")
_OUT = flags.DEFINE_string("out", "runs/online_diagnose.json", "Results.")


def _step(bank, config, add, projection, span_rows, state, query):
    """`pipeline._online_step` returning both halves; `span_rows=None` is the old ridge rule."""
    valid = jnp.concatenate([jnp.ones((bank.shape[0],), bool), state.valid])
    full = jnp.concatenate([bank, jnp.where(state.valid[:, None], state.buffer, 0.0)])
    weights = valid / jnp.sum(valid)
    host = jnp.concatenate([jnp.ones((bank.shape[0],)), jnp.zeros((state.valid.shape[0],))])
    with matmul_precision(config):
        system = gram_system(full, query, config, weights, span_rows=span_rows)
        w = refine(system, config).w
        r = refined_patch_scores(system, w, config)
        h = base_patch_scores(system._replace(weights=host.astype(weights.dtype)), config)
        refined = w @ full.astype(w.dtype)
        points = refined if projection is None else refined @ projection
        new = refined[greedy_coreset_indices(points, add, 0)]
    cap = state.buffer.shape[0]
    slots = (state.cursor + jnp.arange(add)) % cap
    return OnlineState(
        state.buffer.at[slots].set(new),
        state.valid.at[slots].set(True),
        (state.cursor + add) % cap,
    ), (h, r)


@functools.partial(jax.jit, static_argnames=("capacity", "add", "fixed"))
def online_halves(bank, queries, config, capacity, add, fixed):
    """`[T, m]` host and refined patch scores of the online scan (sqeuclidean)."""
    n, c = bank.shape
    state = OnlineState(
        jnp.zeros((capacity, c), bank.dtype), jnp.zeros((capacity,), bool), jnp.zeros((), jnp.int32)
    )
    projection = projection_matrix(c, 128, 0) if c > 128 else None
    _, (h, r) = jax.lax.scan(
        functools.partial(_step, bank, config, add, projection, n if fixed else None),
        state,
        queries,
    )
    return h, r


@jax.jit
def offline_halves(bank, queries, config):
    """`[T, m]` host and refined patch scores of offline PatchCore+ (one query at a time)."""

    def one(q):
        with matmul_precision(config):
            system = gram_system(bank, q, config)
            w = refine(system, config).w
            return base_patch_scores(system, config), refined_patch_scores(system, w, config)

    return jax.lax.map(one, queries)


def fused_auroc(labels, h, r, c):
    """Image AUROC of `max` of the two z-scores under calibration `c` (`calibration.fuse`)."""
    z = np.maximum(
        (h - float(c.host_loc)) / float(c.host_scale),
        (r - float(c.refined_loc)) / float(c.refined_scale),
    )
    return auroc(labels, z.max(-1))


def main(argv):
    """Per cell: the library's PatchCore / offline / online PatchCore+ and the two halves."""
    del argv
    cache = study_cells.FeatureCache(Path("../shared/data"), Path("runs/fusion_cache"), (0, 1, 2))
    out_path = Path(_OUT.value)
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    det = study_cells.detector(_FEAT.value)
    on = study_cells.ONLINE
    for data in _DATA.value:
        feats = cache.get(data, _FEAT.value)
        labels = feats["labels"]
        order = stream_order(len(labels))
        test = jnp.asarray(feats["test"][order])
        lab = labels[order]
        for seed in map(int, _SEEDS.value):
            key = f"{data}|{_FEAT.value}|{_SHOTS.value}|{seed}"
            if key in results:
                continue
            paths = sample_support(feats["pool"], _SHOTS.value, seed).paths
            sup = np.stack([feats["train"][study_cells.image_key(p)] for p in paths])
            t0 = time.time()
            state = det.fit_features(sup)
            row = {"fit_seconds": time.time() - t0}
            bank = state.banks[0].prototypes
            n, c = bank.shape
            row.update(n=int(n), c=int(c))
            cfg = det.config(image_size=None)
            wide = float(cfg.ridge_wide)
            cals = {
                "cal_shipped": state.calibration,
                "cal_wide": det.calibrate(sup, cfg.replace(ridge=wide, ridge_wide=wide)),
            }
            row["cals"] = {k: [float(x) for x in v] for k, v in cals.items()}
            # The library's own numbers (what a user runs).
            t0 = time.time()
            lib = {
                "patchcore": det.score_features(state, test, cfg.replace(use_refinement=False)),
                "offline_plus": det.score_features(state, test, cfg),
                "online_plus": det.score_stream(state, test, cfg, **on),
            }
            row["library"] = {k: auroc(lab, np.asarray(v.image_scores)) for k, v in lib.items()}
            row["library_seconds"] = time.time() - t0
            halves = {"offline": offline_halves(bank, test, cfg)}
            for name, fixed in (("online_old", False), ("online_new", True)):
                t0 = time.time()
                halves[name] = jax.block_until_ready(
                    online_halves(bank, test, cfg, on["capacity"], on["add_per_query"], fixed)
                )
                row[name + "_seconds"] = time.time() - t0
            for name, (h, r) in halves.items():
                h, r = np.asarray(h, np.float64), np.asarray(r, np.float64)
                row[name] = {
                    "host": auroc(lab, h.max(-1)),
                    "refined": auroc(lab, r.max(-1)),
                    **{k: fused_auroc(lab, h, r, v) for k, v in cals.items()},
                    "r_median_normal": float(np.median(r[lab == 0])),
                }
            h_new = np.asarray(halves["online_new"][0])
            row["host_online_minus_patchcore_maxabs"] = float(
                np.max(np.abs(h_new - np.asarray(lib["patchcore"].patch_scores)))
            )
            results[key] = row
            out_path.write_text(json.dumps(results, indent=1))
            print(key, json.dumps(row), flush=True)


if __name__ == "__main__":
    app.run(main)
