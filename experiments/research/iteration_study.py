"""Issue 15: image AUROC of PatchCore+ against its EM and Sinkhorn iteration counts.

On every dev cell (data x features x shots x seed, the cells of RESULTS.md
section 9) each `(num_iters, sinkhorn_iters)` variant is run the shipped way:
the support set's calibration (`calibration.held_out_scores`' hold-outs, banks
built once per cell and shared by the variants) and the test set through
`refine_and_score`; host scores once per cell; image score = max patch score
(the pipeline's). Reported per variant: the
calibrated PatchCore+ (shipped) and the refined-only (paper) image AUROC, as
the 5-seed mean per cell, beside the baseline (the first variant), and how
far the last EM iteration still moved `W` (`Diagnostics.w_rel_change`).

    python -m experiments.research.iteration_study --variants=10x30,5x10,3x10 \
        --json_out=runs/iteration_study.json

Cells already in `--json_out` are kept (resumable). Features come from the
fusion study's cache (`experiments.research.fusion_study`, `--cache_dir`).
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
from protorefine_jax import calibration as cal
from protorefine_jax.app.batching import batched
from protorefine_jax.data import sample_support
from protorefine_jax.metrics import auroc

study_cells.DATA.setdefault("ball_screw", ("folder", "bsdata", "ball_screw"))

_DATA_ROOT = flags.DEFINE_string("data_root", "../shared/data", "Dev data root.")
_CACHE = flags.DEFINE_string("cache_dir", "runs/fusion_cache", "Feature cache (not committed).")
_JSON = flags.DEFINE_string("json_out", "runs/iteration_study.json", "Per-cell results.")
_DATA = flags.DEFINE_list("data", ["metal_plate", "bottle", "ball_screw"], "Dev sets.")
_FEATS = flags.DEFINE_list("features", ["lite0-simple", "lite2-simple"], "Feature sets.")
_SHOTS = flags.DEFINE_list("shots", ["1", "2", "4"], "Shot counts.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds.")
_VARIANTS = flags.DEFINE_list(
    "variants", ["10x30", "5x10", "3x10"], "EMxSinkhorn iteration counts; the first is the base."
)

ALPHA = 0.05
GRID = (32, 32)


def parse_variant(text: str) -> tuple[int, int]:
    """`"10x30"` -> `(10, 30)`."""
    em, sk = text.lower().split("x")
    return int(em), int(sk)


def run_cell(feats: dict, k: int, seed: int, variants: list[tuple[int, int]]) -> dict:
    """AUROC of every variant on one cell (calibrated and refined-only)."""
    support = sample_support(feats["pool"], k, seed)
    sup = np.stack([feats["train"][study_cells.image_key(p)] for p in support.paths])
    test, labels = feats["test"], feats["labels"]
    bank = build_bank(jnp.asarray(sup), ALPHA).prototypes
    base = RefineConfig(image_size=None)
    host = batched(
        lambda x: refine_and_score(bank, jnp.asarray(x), base.replace(use_refinement=False)),
        test,
        8,
    ).patch_scores
    prepared = cal.holdouts(sup, ALPHA, GRID)  # built once, shared by the variants
    out = {}
    for em, sk in variants:
        t0 = time.time()
        cfg = base.replace(num_iters=em, sinkhorn_iters=sk)
        ref = batched(lambda x, c=cfg: refine_and_score(bank, jnp.asarray(x), c), test, 8)
        ref_patch = np.asarray(ref.patch_scores)
        stats = cal.statistics(*cal.held_out_scores(sup, ALPHA, cfg, GRID, prepared))
        fused = np.asarray(cal.fuse(jnp.asarray(host), jnp.asarray(ref_patch), stats))
        out[f"{em}x{sk}"] = {
            "calibrated": auroc(labels, fused.max(1)),
            "refined": auroc(labels, ref_patch.max(1)),
            # How far the last EM iteration still moved W (median, max over
            # the test queries): the case for or against a convergence stop.
            "w_change_median": float(np.median(ref.diagnostics.w_rel_change)),
            "w_change_max": float(np.max(ref.diagnostics.w_rel_change)),
            "seconds": time.time() - t0,
        }
    return out


def report(results: dict, variants: list[str]) -> str:
    """Markdown: 5-seed mean per cell and variant, and the difference to the base."""
    lines = []
    cells: dict[str, list] = {}  # cell -> its seeds' results
    for key, res in results.items():
        cells.setdefault(key.rsplit("_s", 1)[0], []).append(res)
    for kind in ("calibrated", "refined"):
        head = f"| {kind} | " + " | ".join(variants) + " | diff vs " + variants[0] + " |"
        lines += [head, "|" + "---|" * (len(variants) + 2)]
        worst_all = {v: 0.0 for v in variants[1:]}
        for cell, runs in sorted(cells.items()):
            means = [np.mean([r[v][kind] for r in runs if v in r]) for v in variants]
            diffs = [m - means[0] for m in means[1:]]
            for v, d in zip(variants[1:], diffs, strict=True):
                worst_all[v] = d if abs(d) > abs(worst_all[v]) else worst_all[v]
            seeds = len(runs)
            row = " | ".join(f"{m:.2f}" for m in means)
            diff = ", ".join(f"{d:+.2f}" for d in diffs)
            lines.append(f"| {cell} ({seeds} seeds) | {row} | {diff} |")
        lines.append(
            "| largest |diff| | "
            + " | ".join(["-"] + [f"{worst_all[v]:+.2f}" for v in variants[1:]])
            + " | |"
        )
        lines.append("")
    lines += [
        "| last EM step's ||dW|| / ||W||, median (max) over test queries | "
        + " | ".join(variants)
        + " |",
        "|" + "---|" * (len(variants) + 1),
    ]
    for cell, runs in sorted(cells.items()):
        row = []
        for v in variants:
            got = [
                (r[v]["w_change_median"], r[v]["w_change_max"])
                for r in runs
                if "w_change_max" in r.get(v, {})
            ]
            row.append(
                f"{np.median([g[0] for g in got]):.1e} ({max(g[1] for g in got):.1e})"
                if got
                else "-"
            )
        lines.append(f"| {cell} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv):
    """Runs the missing cells, saving after each, then prints the report."""
    del argv
    variants = [parse_variant(v) for v in _VARIANTS.value]
    names = [f"{em}x{sk}" for em, sk in variants]
    path = Path(_JSON.value)
    results = json.loads(path.read_text()) if path.exists() else {}
    cache = study_cells.FeatureCache(Path(_DATA_ROOT.value), Path(_CACHE.value), (0, 1, 2, 3, 4))
    for data in _DATA.value:
        for feat in _FEATS.value:
            feats = cache.get(data, feat)
            for k in map(int, _SHOTS.value):
                for seed in map(int, _SEEDS.value):
                    key = f"{data}_{feat}_k{k}_s{seed}"
                    done = results.get(key, {})
                    todo = [v for v, name in zip(variants, names, strict=True) if name not in done]
                    if not todo:
                        continue
                    done.update(run_cell(feats, k, seed, todo))
                    results[key] = done
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(results, indent=1))
                    print(
                        key,
                        " ".join(
                            f"{n}: {done[n]['calibrated']:.2f}/{done[n]['refined']:.2f}"
                            for n in names
                        ),
                        flush=True,
                    )
    print(report(results, names))


if __name__ == "__main__":
    app.run(main)
