"""WinCLIP and WinCLIP+ behind the detector interface (wraps `clip.winclip`).

The method itself (multi-scale CLIP features, zero-shot prompts, per-scale
banks, Eq. 9 fusion) lives in `protorefine_jax.clip.winclip`; this module
adds the `Detector` protocol of `detectors.base` on top of it. The defaults
are those of `clip.winclip`, defined once there: the coreset ratio per
dataset (`CORESET_ALPHA`), the refinement settings (`winclip_config`: cosine
distance, optax M-step, lam 0.1) and the input size (the CLIP model's).

- the calibrated WinCLIP+ (`fit` keeps `clip.winclip.calibrate`'s per-scale
  statistics in `DetectorState.calibration`): PatchCore+'s support-set
  calibration applied to each few-shot scale (`WinClipConfig.refine`, issue
  14). Unmeasured here (no CLIP weights): it mirrors the shipped PatchCore+.

WinCLIP is `config(use_refinement=False)`, WinCLIP+ `config()`; the paper's
uncalibrated WinCLIP+ is `config(calibrated=False)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jax import Array

from protorefine_jax import calibration
from protorefine_jax.calibration import ScoreCalibration
from protorefine_jax.clip import winclip as winclip_lib
from protorefine_jax.clip.prompts import class_text_features
from protorefine_jax.clip.spec import ClipSpec
from protorefine_jax.config import RefineConfig
from protorefine_jax.detectors.base import DetectorState


def default_alpha(dataset: str) -> float:
    """WinCLIP+'s coreset ratio for a dataset (`CORESET_ALPHA`; MVTec's if not listed)."""
    return winclip_lib.CORESET_ALPHA.get(dataset, winclip_lib.CORESET_ALPHA["mvtec"])


@dataclasses.dataclass(frozen=True)
class WinClip:
    """WinCLIP / WinCLIP+ on one CLIP model.

    Attributes:
      spec: the CLIP architecture.
      tokenizer: the CLIP tokenizer (for the class prompts).
      alpha: coreset ratio of every scale's bank.
      settings: `WinClipConfig` fields other than `refine` (window sizes,
        patch projection, ...) passed to `winclip_config`.
    """

    spec: ClipSpec
    tokenizer: Any
    alpha: float = winclip_lib.CORESET_ALPHA["mvtec"]
    settings: tuple[tuple[str, Any], ...] = ()

    family = "winclip"
    # anomalib's WinCLIP input: Resize((240, 240), bicubic, antialias=True).
    resample = "bicubic"

    @classmethod
    def from_folder(
        cls, clip_dir: str, *, dataset: str = "mvtec", alpha: float | None = None
    ) -> tuple[WinClip, Any]:
        """`(detector, params)` from a local Hugging Face CLIP folder."""
        from protorefine_jax.io.clip_folder import load_clip  # reads files: only when asked

        spec, params, tokenizer = load_clip(clip_dir)
        return cls(spec, tokenizer, default_alpha(dataset) if alpha is None else alpha), params

    @property
    def image_size(self) -> int:
        """Input side in pixels."""
        return self.spec.image_size

    def refinement(self, config: winclip_lib.WinClipConfig) -> RefineConfig:
        """The refinement settings of a scoring config: its few-shot `refine` part."""
        return config.refine

    def config(self, **fields: Any) -> winclip_lib.WinClipConfig:
        """`WinClipConfig` with `winclip_config`'s defaults; `fields` override.

        `fields` may be `RefineConfig` fields (e.g. `lam`, `use_refinement`)
        or `WinClipConfig` fields.
        """
        return winclip_lib.winclip_config(clip=self.spec, **{**dict(self.settings), **fields})

    def features(self, params: Any, images: Array) -> Any:
        """`[B, S, S, 3]` RGB -> `MultiscaleFeatures` with leading axis B (jitted)."""
        return winclip_lib.extract_multiscale(params, images, self.config())

    def prepare(self, params: Any, category: str) -> Array:
        """`[2, E]` normal / anomalous prompt embeddings of the raw category (as anomalib)."""
        return class_text_features(self.spec, params, self.tokenizer, category)

    def fit_features(
        self,
        features: Any,
        *,
        views: Any = None,
        pseudo: Any = None,
        alpha: float | None = None,
        context: Array | None = None,
        config: winclip_lib.WinClipConfig | None = None,
        calibrate: bool = True,
        score_support: bool = False,
    ) -> DetectorState:
        """State from the support features: per scale a coreset bank and the full memory.

        `banks` is a `clip.winclip.WinClipBanks`: it iterates, indexes and
        counts as the tuple of per-scale coreset `MemoryBank`s (what WinCLIP+
        refines) and also holds every support row (plain WinCLIP's memory,
        `WinClipConfig.plain_memory`). `context` is the class text.
        `calibration` is `clip.winclip.calibrate`'s per-scale statistics under
        `config`'s refinement (default `self.config()`, the shipped WinCLIP+);
        `calibrate=False` skips it (WinCLIP+ then scores with the refined
        prototypes alone). `views` must be None and `score_support` False:
        WinCLIP+ has no held-out support scores (nothing here derives a
        threshold for it).
        """
        if views is not None or pseudo is not None or score_support:
            raise ValueError(
                "WinCLIP+ has no held-out support scores and no refinement check: pass no "
                "views or pseudo."
            )
        alpha = self.alpha if alpha is None else alpha
        config = self.config() if config is None else config
        banks = winclip_lib.build_banks(features, alpha)
        if not calibrate:
            return DetectorState(banks=banks, context=context)
        cal = self.calibrate(features, config, alpha=alpha)
        return DetectorState(banks=banks, context=context, calibration=cal, calibrated_under=config)

    def view_features(self, params: Any, support_images: Array) -> None:
        """None: WinCLIP+ calibrates without nuisance views."""
        del params, support_images

    def checks_refinement(self, config: Any) -> bool:
        """False: WinCLIP+ runs no refinement check."""
        del config
        return False

    def pseudo_features(self, params: Any, support_images: Array) -> None:
        """None: WinCLIP+ fuses every scale's refined half without a refinement check."""
        del params, support_images

    def calibrate(
        self,
        features: Any,
        config: winclip_lib.WinClipConfig | None = None,
        *,
        alpha: float | None = None,
    ) -> tuple[ScoreCalibration, ...]:
        """Per-scale support-set calibration of the support `MultiscaleFeatures` under `config`."""
        return winclip_lib.calibrate(
            features,
            self.config() if config is None else config,
            alpha=self.alpha if alpha is None else alpha,
        )

    def fit(
        self,
        params: Any,
        support_images: Array,
        *,
        category: str,
        alpha: float | None = None,
        config: winclip_lib.WinClipConfig | None = None,
        calibrate: bool = True,
    ) -> DetectorState:
        """State from the `[k, S, S, 3]` support images of `category` (see `fit_features`)."""
        text = self.prepare(params, category)
        feats = self.features(params, support_images)
        return self.fit_features(
            feats, alpha=alpha, context=text, config=config, calibrate=calibrate
        )

    def score_features(
        self, state: DetectorState, features: Any, config: winclip_lib.WinClipConfig
    ) -> winclip_lib.WinClipOutput:
        """Scores a batch of `MultiscaleFeatures` (jitted `clip.winclip.score`)."""
        if state.context is None:
            raise ValueError("WinCLIP needs the class text embeddings: fit with a category.")
        refine = config.refine
        if refine.use_refinement and refine.calibrated and state.calibration is not None:
            measured = state.calibrated_under
            calibration.check_applies(None if measured is None else measured.refine, refine)
        return winclip_lib.score(features, state.banks, state.context, config, state.calibration)

    def score_stream(self, state: DetectorState, features: Any, config: Any, **online: int):
        """Refuses: the online variant is implemented for PatchCore+ only."""
        raise ValueError("the online variant is implemented for PatchCore+ only.")

    def score(
        self, params: Any, state: DetectorState, images: Array, config: winclip_lib.WinClipConfig
    ) -> winclip_lib.WinClipOutput:
        """Scores `[B, S, S, 3]` query images: fused image scores, maps, diagnostics."""
        return self.score_features(state, self.features(params, images), config)

    def describe(self, state: DetectorState | None = None) -> dict[str, Any]:
        """CLIP widths, grid and input size (and the banks, given a state)."""
        out: dict[str, Any] = {
            "vision_width": self.spec.vision_width,
            "embed_dim": self.spec.embed_dim,
            "grid": list(self.spec.grid_size),
            "image_size": self.spec.image_size,
        }
        if state is not None:
            out["banks"] = [b.describe() for b in state.banks]
        return out
