"""The interface every detector of this package implements.

A detector is a feature extractor plus a way to turn support features into a
state and query features into scores. Both detectors (`patchcore.PatchCore`,
`winclip.WinClip`) follow the same protocol, so the evaluation, study and
benchmark code in `experiments/` treats them alike:

  detector = PatchCore.create("efficientnet_lite0")
  params = detector.load_params()
  state = detector.fit(params, support_images)            # banks, calibration
  out = detector.score(params, state, query_images, detector.config())
  out.image_scores, out.maps, out.diagnostics

`fit` and `score` are the composition of two halves that callers with cached
features use directly: `features(params, images)` and `fit_features` /
`score_features`. Each detector's defaults (coreset ratio, aggregation,
refinement weight) are defined once, in its own module.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

from jax import Array

from protorefine_jax.bank import MemoryBank
from protorefine_jax.config import RefineConfig
from protorefine_jax.pipeline import Diagnostics


class DetectorState(NamedTuple):
    """Everything a detector derives from the support set (a pytree).

    Attributes:
      banks: one `MemoryBank` per scale: one for PatchCore(+), one per
        few-shot scale for WinCLIP(+) (patch tokens, then each window size).
        Always a sequence of `MemoryBank` (a tuple, or WinCLIP's
        `WinClipBanks`, which iterates and indexes as its coreset tuple and
        also carries the full support memory), so callers never ask which
        kind they hold.
      context: support-independent per-category data the scores need
        (WinCLIP: the `[2, E]` class text embeddings; PatchCore: None).
      calibration: statistics of the support set that `score_features`
        applies to the scores (None: scores as the method defines them).
        PatchCore+: one `calibration.ScoreCalibration`; WinCLIP+: a tuple
        of them, one per few-shot scale (`clip.winclip.calibrate`).
        The slot where a support-set self-calibration plugs in: compute it
        in `fit_features`, apply it in `score_features`.
      calibrated_under: the scoring config (the detector's `config()` type)
        whose refinement the calibration was measured under; `score_features`
        refuses to fuse scores computed under other refinement settings
        (`calibration.check_applies`). None when there is no calibration.
      support_scores: the support images' held-out image scores in the
        units of `calibrated_under`'s scoring (`calibration.SupportScores`):
        what a normal-only decision threshold is derived from, and what names
        outliers. None when not computed.
      refinement_check: whether the fit kept the refined half in the fused
        score, and why (`calibration.RefinementCheck`); None when no check
        ran (WinCLIP+, `pseudo=0`, or no pasted copies given).
    """

    banks: tuple[MemoryBank, ...]
    context: Any = None
    calibration: Any = None
    calibrated_under: Any = None
    support_scores: Any = None
    refinement_check: Any = None


class DetectorOutput(Protocol):
    """What every detector's `score` returns (at least these fields)."""

    image_scores: Array  # [B]
    maps: Array  # [B, H, W]
    diagnostics: Diagnostics  # per query, each field [B]


class Detector(Protocol):
    """One few-shot anomaly detector: extractor, support state, scoring."""

    family: str
    image_size: int
    resample: str  # resize filter of the input images ("bilinear" or "bicubic")
    alpha: float  # coreset ratio of the banks

    def features(self, params: Any, images: Array) -> Any:
        """`[B, S, S, 3]` images -> features with leading axis B (jitted)."""

    def prepare(self, params: Any, category: str) -> Any:
        """Support-independent per-category context (`DetectorState.context`)."""

    def load_params(self, weights: str | None = None) -> Any:
        """Backbone (or CLIP) variables."""

    def fit_features(
        self,
        features: Any,
        *,
        views: Any = None,
        pseudo: Any = None,
        alpha: float | None = None,
        context: Any = None,
        config: Any = None,
        calibrate: bool = True,
        score_support: bool = True,
    ) -> DetectorState:
        """`DetectorState` from the support images' features, calibrated under `config`."""

    def view_features(self, params: Any, support_images: Array) -> Any:
        """Features of the support images' nuisance views (None: the detector uses none)."""

    def pseudo_features(self, params: Any, support_images: Array) -> Any:
        """Features of pasted-defect copies for the refinement check (None: no check)."""

    def checks_refinement(self, config: Any) -> bool:
        """Whether fitting under `config` runs the refinement check (`pseudo_features` needed)."""

    def calibrate(self, features: Any, config: Any = None, *, alpha: float | None = None) -> Any:
        """The support-set calibration of `features` under `config`'s refinement."""

    def refinement(self, config: Any) -> RefineConfig:
        """The `RefineConfig` part of a scoring config."""

    def fit(self, params: Any, support_images: Array, **kwargs: Any) -> DetectorState:
        """`DetectorState` from the support images."""

    def config(self, **fields: Any) -> Any:
        """The detector's scoring config: its defaults plus `fields`."""

    def score_features(self, state: DetectorState, features: Any, config: Any) -> DetectorOutput:
        """Scores a batch of query features."""

    def score_stream(
        self, state: DetectorState, features: Any, config: Any, *, capacity: int, add_per_query: int
    ) -> DetectorOutput:
        """The online variant over a stream of query features (PatchCore+ only)."""

    def score(self, params: Any, state: DetectorState, images: Array, config: Any):
        """Scores a batch of query images."""

    def describe(self, state: DetectorState | None = None) -> dict[str, Any]:
        """What results should record about the features (and the state's banks)."""


def bank_size(state: DetectorState) -> int:
    """Rows of the largest bank of a state."""
    return max(int(b.prototypes.shape[0]) for b in state.banks)


def bank_degenerate(state: DetectorState) -> bool:
    """Whether any bank of a state is degenerate (docs/method.md, "ridge rule")."""
    return any(bool(b.degenerate) for b in state.banks)


def describe_banks(state: DetectorState) -> str:
    """`MemoryBank.describe()` of every bank of a state, one line."""
    return "; ".join(b.describe() for b in state.banks)
