"""Complete detectors behind one interface (`base.Detector`).

- `PatchCore` (patchcore): CNN backbone + aggregation, coreset bank,
  refinement, scores; PatchCore+ by default, PatchCore with
  `config(use_refinement=False)`.
- `WinClip` (winclip): WinCLIP / WinCLIP+ on a CLIP model. Not imported
  here: it needs `transformers`; `from protorefine_jax.detectors.winclip
  import WinClip`.
"""

from protorefine_jax.detectors.base import (
    Detector,
    DetectorOutput,
    DetectorState,
    bank_degenerate,
    bank_size,
    describe_banks,
)
from protorefine_jax.detectors.patchcore import PatchCore

__all__ = [
    "Detector",
    "DetectorOutput",
    "DetectorState",
    "PatchCore",
    "bank_degenerate",
    "bank_size",
    "describe_banks",
]
