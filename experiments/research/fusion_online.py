"""Issue 14: does the online variant keep the calibrated PatchCore+'s guarantee?

Scores each dev cell's test stream with the online PatchCore+ (the study's
ring buffer, `study_cells.ONLINE`, stream order `hosts.stream_order`),
calibrated from the support set as the shipped detector does, and writes the
image AUROC per cell next to the stored host / refined cells of
`fusion_study` (same support sets).

    nice -n 5 python -m experiments.research.fusion_online --data=metal_plate,bottle --shots=1,2,4
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from experiments.research import study_cells
from protorefine_jax.app.batching import score_features
from protorefine_jax.data import sample_support
from protorefine_jax.metrics import auroc

study_cells.DATA.setdefault("ball_screw", ("folder", "bsdata", "ball_screw"))

_DATA = flags.DEFINE_list("data", ["metal_plate", "bottle"], "Dev sets.")
_FEAT = flags.DEFINE_string("features", "lite0-simple", "Feature set.")
_SHOTS = flags.DEFINE_list("shots", ["1", "2", "4"], "Shot counts.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds.")
_OUT = flags.DEFINE_string("out", "runs/fusion_online.json", "Results (appended per cell).")


def main(argv):
    """Online calibrated PatchCore+ per cell."""
    del argv
    cache = study_cells.FeatureCache(
        Path("../shared/data"), Path("runs/fusion_cache"), (0, 1, 2, 3, 4)
    )
    out_path = Path(_OUT.value)
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    det = study_cells.detector(_FEAT.value)
    for data in _DATA.value:
        feats = cache.get(data, _FEAT.value)
        for k in map(int, _SHOTS.value):
            for seed in map(int, _SEEDS.value):
                key = f"{data}|{_FEAT.value}|{k}|{seed}"
                if key in results:
                    continue
                paths = sample_support(feats["pool"], k, seed).paths
                sup = np.stack([feats["train"][study_cells.image_key(p)] for p in paths])
                state = det.fit_features(sup)
                start = time.time()
                out = score_features(
                    det, state, feats["test"], det.config(), 16, study_cells.ONLINE
                )
                results[key] = {
                    "online_calibrated": auroc(feats["labels"], np.asarray(out.image_scores)),
                    "seconds": time.time() - start,
                }
                out_path.write_text(json.dumps(results, indent=1))
                print(key, results[key], flush=True)


if __name__ == "__main__":
    app.run(main)
