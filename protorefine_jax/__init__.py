"""protorefine_jax: FastRef prototype refinement for few-shot anomaly detection in JAX.

The public API, re-exported from the modules named after each concept:

- `build_bank` / `MemoryBank` (bank), `greedy_coreset` (coreset): the memory bank.
- `sinkhorn_plan` (transport): the E-step.
- `refine` and friends (refine): least squares and the EM loop.
- `anomaly_map` (scoring): patch, image and pixel scores.
- `refine_and_score`, `make_detect`, `online_refine_and_score` (pipeline).
"""

from protorefine_jax.bank import MemoryBank, build_bank
from protorefine_jax.config import RefineConfig
from protorefine_jax.coreset import coreset_size, greedy_coreset
from protorefine_jax.pipeline import (
    Diagnostics,
    RefineOutput,
    make_detect,
    online_refine_and_score,
    refine_and_score,
    score_query,
)
from protorefine_jax.transport import sinkhorn_plan

__all__ = [
    "Diagnostics",
    "MemoryBank",
    "RefineConfig",
    "RefineOutput",
    "build_bank",
    "coreset_size",
    "greedy_coreset",
    "make_detect",
    "online_refine_and_score",
    "refine_and_score",
    "score_query",
    "sinkhorn_plan",
]
