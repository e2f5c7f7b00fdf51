"""protorefine_jax: FastRef prototype refinement for few-shot anomaly detection in JAX.

The public API, re-exported from the modules named after each concept. The
end-to-end functions:

- `build_bank` / `MemoryBank` (bank), `greedy_coreset` (coreset): the memory bank.
- `calibrate` / `ScoreCalibration` (calibration): the support-set statistics
  of the calibrated PatchCore+.
- `refine_and_score`, `score_query`, `make_detect`, `online_refine_and_score`
  (pipeline): refine the bank per query and score it; every one takes the
  bank as a `MemoryBank` or as its `[n, c]` prototypes.

The building blocks a researcher swaps, in the order a query meets them:

- `gram_system` / `GramSystem` (gram): the inner products the EM loop runs on.
- `sinkhorn_plan` (transport, ott-jax) and `sinkhorn_t` (the transposed,
  fixed-iteration E-step the loop uses).
- `refine.refine` / `Refinement` (the `refine` module: the EM loop, E-step and
  optax M-step; the module keeps its name, so the function is not re-exported).
- `base_patch_scores`, `refined_patch_scores`, `anomaly_map` (scoring); `MapConfig`
  (config): the map rendering alone (`RefineConfig.map_config`).
- `fuse` (calibration): the calibrated max of host and refined z-scores.
"""

from protorefine_jax.bank import MemoryBank, build_bank
from protorefine_jax.calibration import ScoreCalibration, calibrate, fuse
from protorefine_jax.config import MapConfig, RefineConfig
from protorefine_jax.coreset import coreset_size, greedy_coreset
from protorefine_jax.gram import GramSystem, gram_system
from protorefine_jax.pipeline import (
    Diagnostics,
    RefineOutput,
    make_detect,
    online_refine_and_score,
    refine_and_score,
    score_query,
)
from protorefine_jax.refine import Refinement
from protorefine_jax.scoring import anomaly_map, base_patch_scores, refined_patch_scores
from protorefine_jax.transport import sinkhorn_plan, sinkhorn_t

__all__ = [
    "Diagnostics",
    "GramSystem",
    "MapConfig",
    "MemoryBank",
    "RefineConfig",
    "RefineOutput",
    "Refinement",
    "ScoreCalibration",
    "anomaly_map",
    "base_patch_scores",
    "build_bank",
    "calibrate",
    "coreset_size",
    "fuse",
    "gram_system",
    "greedy_coreset",
    "make_detect",
    "online_refine_and_score",
    "refine_and_score",
    "refined_patch_scores",
    "score_query",
    "sinkhorn_plan",
    "sinkhorn_t",
]
