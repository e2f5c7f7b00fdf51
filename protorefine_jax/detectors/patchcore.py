"""PatchCore and PatchCore+ as one detector: backbone, aggregation, bank, refinement, scores.

The defaults of this detector are defined here and only here:

- `ALPHA`: coreset ratio of the memory bank (paper Sec. 6.1: 0.05).
- `AGGREGATION`: PatchCore aggregation per backbone. Wide-ResNet-50-2: the
  official PatchCore pooling. EfficientNet-Lite: the simple 3x3 mean, which
  beats the official pooling for PatchCore and PatchCore+ on both dev
  datasets (RESULTS.md, "Main results"; docs/method.md, "Features").
- `IMAGE_SIZE`: input side in pixels (256, stride-8 grid of 32 x 32).
- the refinement settings (lam 0.3, closed-form M-step, ridge rule, ...):
  the defaults of `RefineConfig` (config.py), which are PatchCore+'s.

- the calibrated score of PatchCore+ (`calibration`): `fit` keeps the
  robust location and scale of the host and refined scores of held-out
  support quadrants; PatchCore+ scores each patch with the larger of the two
  standardised scores (RESULTS.md, "Calibrated PatchCore+").

PatchCore is `config(use_refinement=False)`, PatchCore+ `config()`; the
paper's uncalibrated PatchCore+ is `config(calibrated=False)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from protorefine_jax import calibration, pseudo_anomalies
from protorefine_jax.bank import build_bank
from protorefine_jax.calibration import ScoreCalibration
from protorefine_jax.config import RefineConfig
from protorefine_jax.detectors.base import DetectorState
from protorefine_jax.features import Extractor, get_extractor
from protorefine_jax.features.preprocess import image_hw
from protorefine_jax.pipeline import RefineOutput, online_refine_and_score, refine_and_score

ALPHA = 0.05
"""Coreset ratio of the PatchCore(+) memory bank (paper Sec. 6.1)."""

AGGREGATION = {
    "wide_resnet50_2": "official",
    "efficientnet_lite0": "simple",
    "efficientnet_lite2": "simple",
}
"""PatchCore aggregation per backbone (docs/method.md, "Features")."""

IMAGE_SIZE = 256
"""Input side in pixels."""


def _as_array(features: Any) -> Any:
    """Device arrays as they are; anything else as numpy (so the refiner checks its values)."""
    return features if isinstance(features, jax.Array) else np.asarray(features)


def default_aggregation(backbone: str) -> str:
    """`AGGREGATION[backbone]`; the official pooling for backbones not listed."""
    return AGGREGATION.get(backbone, "official")


@dataclasses.dataclass(frozen=True)
class PatchCore:
    """PatchCore / PatchCore+ on a CNN backbone (see the module docstring).

    Attributes:
      extractor: backbone plus aggregation (`features.get_extractor`); its
        `grid` and `feature_dim` are the detector's.
      alpha: coreset ratio of the bank.
      views: nuisance views per support image in the hold-outs of the
        support scores (`calibration.VIEWS`; 0: the originals only).
      holdouts: how the support hold-outs are computed: exactly up to
        `holdouts.exact_max` support images, approximated above
        (`calibration.HoldoutBudget`).
      pseudo: pasted-defect copies per checked support image in the fit's
        `calibration.refinement_check` (`calibration.PSEUDO_ANOMALIES`, 16;
        0: no check, the refined half is always fused).
    """

    extractor: Extractor
    alpha: float = ALPHA
    views: int = calibration.VIEWS
    holdouts: calibration.HoldoutBudget = calibration.HoldoutBudget()
    pseudo: int = calibration.PSEUDO_ANOMALIES

    family = "patchcore"

    def __post_init__(self):
        for name in ("views", "pseudo"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}.")

    # Resize filter of the input images (data.imageio.resize_rgb).
    resample = "bilinear"

    @classmethod
    def create(
        cls,
        backbone: str = "efficientnet_lite0",
        aggregation: str | None = None,
        image_size: int | tuple[int, int] = IMAGE_SIZE,
        *,
        alpha: float | None = None,
        pretrain_dim: int | None = None,
        target_dim: int | None = None,
        allow_repetition: bool = False,
        views: int | None = None,
        pseudo: int | None = None,
    ) -> PatchCore:
        """The detector of a backbone, with this module's defaults for what is None."""
        extractor = get_extractor(
            backbone,
            aggregation or default_aggregation(backbone),
            image_size,
            pretrain_dim=pretrain_dim,
            target_dim=target_dim,
            allow_repetition=allow_repetition,
        )
        return cls(
            extractor,
            ALPHA if alpha is None else alpha,
            calibration.VIEWS if views is None else views,
            pseudo=calibration.PSEUDO_ANOMALIES if pseudo is None else pseudo,
        )

    @property
    def image_size(self) -> int | tuple[int, int]:
        """Input side in pixels, or `(height, width)` for non-square inputs."""
        return self.extractor.image_size

    def load_params(self, weights: str | None = None) -> Any:
        """Backbone variables: `"random"`, a checkpoint path, or None/"" (shipped weights)."""
        if weights == "random":
            return self.extractor.init_params(jax.random.PRNGKey(0))
        return self.extractor.load_params(weights or None)

    def features(self, params: Any, images: Array) -> Array:
        """`[B, S, S, 3]` RGB in [0, 255] -> `[B, m, c]` patch features (jitted)."""
        return self.extractor.extract(params, images)

    def prepare(self, params: Any, category: str) -> None:
        """Per-category context of the scores: none for PatchCore."""
        del params, category

    def fit_features(
        self,
        features: Array,
        *,
        views: Array | None = None,
        pseudo: Array | None = None,
        alpha: float | None = None,
        context: Any = None,
        config: RefineConfig | None = None,
        calibrate: bool = True,
        score_support: bool = True,
    ) -> DetectorState:
        """State from the `[k, m, c]` support features: the bank, its calibration, support scores.

        With `pseudo` (`[n, P, m, c]` features of pasted-defect copies of the
        checked images, `pseudo_features`) and a calibrated PatchCore+
        `config`, the refinement check decides whether the refined half is
        fused at all (`calibration.refinement_check`; recorded in
        `DetectorState.refinement_check` and `ScoreCalibration.refined_on`,
        and the support scores are in the units it decided).

        The calibration (`protorefine_jax.calibration`) scores held-out
        quadrants of the support images with the host and the refinement of
        `config` (default: `self.config()`, the shipped PatchCore+) and keeps
        their robust location and scale; `score_features` fuses the two
        scores with it. The state records `config` and, with
        `score_support`, each support image's held-out image score under it
        (`calibration.SupportScores`: over its quadrant hold-outs and those
        of its nuisance `views`, `[k, V, m, c]` features when given, what a
        normal-only threshold is derived from; with `k >= 3` also against
        the other images, which names outliers). Above
        `holdouts.exact_max` images the hold-outs are cut from the bank's
        coreset and refined on a budget (`calibration.shared_held_out`).
        The views widen the
        threshold's hold-outs only: fusion statistics pooled with them were
        no closer to new normal images (RESULTS.md, "Calibration that sees
        new parts"). `calibrate=False` keeps the bank only (PatchCore+ then
        scores with the refined prototypes alone).
        """
        del context  # PatchCore needs no per-category context
        alpha = self.alpha if alpha is None else alpha
        config = self.config() if config is None else config
        bank = build_bank(jnp.asarray(features), alpha)
        if not calibrate:
            return DetectorState(banks=(bank,))
        grid = self.extractor.grid
        check = None
        if pseudo is not None and self.checks_refinement(config):
            check = calibration.refinement_check(
                features, alpha, config, grid, pseudo, views, self.holdouts
            )

        def decided(cal: ScoreCalibration) -> ScoreCalibration:
            if check is None:
                return cal
            return cal._replace(refined_on=jnp.float32(check.keep))

        if not score_support:
            cal = decided(calibration.calibrate(features, config, alpha=alpha, grid_shape=grid))
            return DetectorState(
                banks=(bank,), calibration=cal, calibrated_under=config, refinement_check=check
            )
        k = np.shape(features)[0]
        held = calibration.held_out(
            features,
            alpha,
            config,
            grid,
            views,
            cross=k >= 3,
            budget=self.holdouts,
            bank_indices=bank.indices,
        )
        cal = decided(calibration.statistics(*calibration.paired_originals(held)))
        return DetectorState(
            banks=(bank,),
            calibration=cal,
            calibrated_under=config,
            support_scores=calibration.support_image_scores(held, config, cal),
            refinement_check=check,
        )

    def calibrate(
        self, features: Array, config: RefineConfig | None = None, *, alpha: float | None = None
    ) -> ScoreCalibration:
        """The support-set calibration of `[k, m, c]` features under `config`'s refinement."""
        return calibration.calibrate(
            features,
            self.config() if config is None else config,
            alpha=self.alpha if alpha is None else alpha,
            grid_shape=self.extractor.grid,
        )

    def view_features(self, params: Any, support_images: Array) -> Array | None:
        """`[k, V, m, c]` features of the support images' nuisance views (None if `views` is 0)."""
        if not self.views:
            return None
        views = calibration.nuisance_views(np.asarray(support_images), self.views)
        # One image's views per call: one compiled shape, memory of V images.
        return np.stack([np.asarray(self.features(params, v)) for v in views])

    def checks_refinement(self, config: RefineConfig) -> bool:
        """Whether fitting under `config` runs the refinement check (calibrated PatchCore+)."""
        return bool(self.pseudo) and config.use_refinement and config.calibrated

    def pseudo_features(self, params: Any, support_images: Array) -> Array | None:
        """`[n, P, m, c]` features of pasted-defect copies of the checked support images.

        The images are `calibration.check_images(k, self.holdouts)`; None if
        `pseudo` is 0 (no refinement check).
        """
        if not self.pseudo:
            return None
        images = np.asarray(support_images)
        chosen = images[calibration.check_images(len(images), self.holdouts)]
        copies, _ = pseudo_anomalies.support_pseudo_anomalies(chosen, self.pseudo)
        # One image's copies per call: one compiled shape, memory of P images.
        return np.stack([np.asarray(self.features(params, c)) for c in copies])

    def fit(
        self,
        params: Any,
        support_images: Array,
        *,
        alpha: float | None = None,
        config: RefineConfig | None = None,
        calibrate: bool = True,
    ) -> DetectorState:
        """State from the `[k, S, S, 3]` support images (see `fit_features`)."""
        feats = self.features(params, support_images)
        views = self.view_features(params, support_images) if calibrate else None
        checked = calibrate and self.checks_refinement(self.config() if config is None else config)
        pseudo = self.pseudo_features(params, support_images) if checked else None
        return self.fit_features(
            feats, views=views, pseudo=pseudo, alpha=alpha, config=config, calibrate=calibrate
        )

    def refinement(self, config: RefineConfig) -> RefineConfig:
        """The refinement settings of a scoring config: the config itself."""
        return config

    def config(self, **fields: Any) -> RefineConfig:
        """`RefineConfig` on this extractor's grid and map size; `fields` override.

        Everything not in `fields` is `RefineConfig`'s default (PatchCore+'s
        settings); `use_refinement=False` gives PatchCore.
        """
        hw = image_hw(self.extractor.image_size)
        base = dict(distance="sqeuclidean", grid_shape=self.extractor.grid, image_size=hw)
        return RefineConfig(**{**base, **fields})

    def score_features(
        self, state: DetectorState, features: Array, config: RefineConfig
    ) -> RefineOutput:
        """Scores `[B, m, c]` query features (jitted `refine_and_score`).

        Host (numpy) features are value-checked on the host and a bad one
        raises; device features are flagged per query in `inputs_ok`. A
        calibrated state refuses a `config` whose refinement differs from the
        one its calibration was measured under (`calibration.check_applies`).
        """
        if config.use_refinement and config.calibrated and state.calibration is not None:
            calibration.check_applies(state.calibrated_under, config)
        return refine_and_score(
            state.banks[0].prototypes, _as_array(features), config, state.calibration
        )

    def score_stream(
        self,
        state: DetectorState,
        features: Array,
        config: RefineConfig,
        *,
        capacity: int,
        add_per_query: int,
    ) -> RefineOutput:
        """Online PatchCore+ over `[T, m, c]` query features in stream order."""
        return online_refine_and_score(
            state.banks[0].prototypes,
            _as_array(features),
            config,
            capacity=capacity,
            add_per_query=add_per_query,
            calibration=state.calibration,
        )

    def score(
        self, params: Any, state: DetectorState, images: Array, config: RefineConfig
    ) -> RefineOutput:
        """Scores `[B, S, S, 3]` query images: image scores, maps, diagnostics."""
        return self.score_features(state, self.features(params, images), config)

    def describe(self, state: DetectorState | None = None) -> dict[str, Any]:
        """Backbone, aggregation, feature size and grid (and the bank, given a state)."""
        ex = self.extractor
        out: dict[str, Any] = {
            "backbone": ex.name,
            "aggregation": ex.aggregation,
            "feature_dim": ex.feature_dim,
            "grid": list(ex.grid),
            "image_size": ex.image_size,
            "views": self.views,
            "pseudo_anomalies": self.pseudo,
        }
        if state is not None:
            out["banks"] = [b.describe() for b in state.banks]
        return out
