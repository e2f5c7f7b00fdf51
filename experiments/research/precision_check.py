"""float32 vs float64 refinement on the SPEC 8 reproduction cells (issue 13 item 4).

RESULTS.md section 1 / 2 cells that use ridge 1e-4: PatchCore+ and "W only"
with SPEC 8's settings (`methods.REPRODUCTION`), metal_plate, EfficientNet-Lite0
"simple" features (152-d), 1/2/4 shots, 5 seeds; each cell is run with
`precision="float32"` (the study's) and `"float64"`. Features are extracted
once into --cache_dir (the study's `FeatureCache`).

  python -m experiments.research.precision_check --data_root=../shared/data \
      --cache_dir=/tmp/num_cache --out=precision_check.json
"""

from __future__ import annotations

import json
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments.research import study_cells  # noqa: E402
from protorefine_jax import RefineConfig  # noqa: E402
from protorefine_jax.app.batching import score_features  # noqa: E402
from protorefine_jax.data import sample_support  # noqa: E402
from protorefine_jax.metrics import evaluate  # noqa: E402

_DATA_ROOT = flags.DEFINE_string("data_root", "../shared/data", "Folder holding mpdd/.")
_CACHE_DIR = flags.DEFINE_string("cache_dir", "runs/study_cache", "Feature cache.")
_OUT = flags.DEFINE_string("out", "precision_check.json", "Where the table goes (JSON).")
_SEEDS = flags.DEFINE_integer("seeds", 5, "Seeds first_seed..seeds-1.")
_FIRST_SEED = flags.DEFINE_integer("first_seed", 0, "First seed (to resume a run).")
_SHOTS = flags.DEFINE_list("shots", ["1", "2", "4"], "Shot counts.")
_METHODS = flags.DEFINE_list(
    "methods", ["W only", "patchcore+"], "Method label prefixes, in order."
)

METHODS = {
    "patchcore+ (SPEC 8, ridge 1e-4)": study_cells.REPRODUCTION,
    "W only (SPEC 8, ridge 1e-4)": {**study_cells.REPRODUCTION, "use_transport": False},
}


def main(argv):
    """Runs every cell in both precisions and writes the table."""
    del argv
    cache = study_cells.FeatureCache(
        Path(_DATA_ROOT.value), Path(_CACHE_DIR.value), tuple(range(_SEEDS.value))
    )
    feats = cache.get("metal_plate", "lite0-simple")
    det = study_cells.detector("lite0-simple")
    grid = det.extractor.grid
    rows = []
    chosen = [(k, v) for p in _METHODS.value for k, v in METHODS.items() if k.startswith(p)]
    for label, fields in chosen:
        for shots in (int(s) for s in _SHOTS.value):
            for seed in range(_FIRST_SEED.value, _SEEDS.value):
                support = sample_support(feats["pool"], shots, seed)
                sup = np.stack([feats["train"][study_cells.image_key(p)] for p in support.paths])
                res = {}
                for prec in ("float32", "float64"):
                    cfg = RefineConfig(
                        grid_shape=grid,
                        image_size=(256, 256),
                        precision=prec,
                        **fields,
                    )
                    calibrate = cfg.use_refinement and cfg.calibrated
                    state = det.fit_features(
                        sup, alpha=study_cells.ALPHA, config=cfg, calibrate=calibrate
                    )
                    out = score_features(det, state, feats["test"], cfg, 16, None)
                    met = evaluate(
                        feats["labels"], np.asarray(out.image_scores), feats["masks"], out.maps
                    )
                    res[prec] = (met, np.asarray(out.patch_scores, np.float64))
                s32, s64 = res["float32"][1], res["float64"][1]
                ratio = s32 / np.maximum(s64, 1e-30)
                rows.append(
                    {
                        "shots": shots,
                        "seed": seed,
                        "method": label,
                        "image_auroc_f32": res["float32"][0]["image_auroc"],
                        "image_auroc_f64": res["float64"][0]["image_auroc"],
                        "pixel_auroc_f32": res["float32"][0]["pixel_auroc"],
                        "pixel_auroc_f64": res["float64"][0]["pixel_auroc"],
                        "patch_score_ratio_median": float(np.median(ratio)),
                        "patch_score_ratio_p95": float(np.percentile(ratio, 95)),
                        "argmax_moved": int(np.sum(s32.argmax(1) != s64.argmax(1))),
                        "images": int(s32.shape[0]),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
                Path(_OUT.value).write_text(json.dumps({"rows": rows}, indent=1))
    summary = {}
    for label, _ in chosen:
        for shots in (int(s) for s in _SHOTS.value):
            sel = [r for r in rows if r["method"] == label and r["shots"] == shots]
            a32 = np.array([r["image_auroc_f32"] for r in sel])
            a64 = np.array([r["image_auroc_f64"] for r in sel])
            summary[f"{label} | {shots}-shot"] = {
                "image_auroc_f32": f"{a32.mean():.1f} ± {a32.std():.1f}",
                "image_auroc_f64": f"{a64.mean():.1f} ± {a64.std():.1f}",
                "ratio_median": float(np.median([r["patch_score_ratio_median"] for r in sel])),
                "argmax_moved": int(sum(r["argmax_moved"] for r in sel)),
            }
    for k, v in summary.items():
        print(k, v)
    Path(_OUT.value).write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    app.run(main)
