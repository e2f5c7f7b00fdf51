"""A library detector in fixed-size batches: what eval, study and bench run.

`Host` holds one detector of `protorefine_jax.detectors` (PatchCore(+) or
WinCLIP(+)) with its parameters and a compiled batch size; it pads batches to
that size so every batch reuses one compiled program. Nothing here knows
which detector it holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.methods import Method
from protorefine_jax.detectors import Detector, DetectorState


def batch_size_of(tree: Any) -> int:
    """Leading-axis size shared by every leaf of `tree`."""
    return len(jax.tree_util.tree_leaves(tree)[0])


def take(tree: Any, index) -> Any:
    """`leaf[index]` for every leaf, on the device for device arrays."""
    return jax.tree_util.tree_map(
        lambda x: x[jnp.asarray(index)] if isinstance(x, jax.Array) else np.asarray(x)[index],
        tree,
    )


def stack(trees: list[Any]) -> Any:
    """Stacks per-item pytrees along a new leading axis."""
    return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *trees)


def batched(fn: Callable[[Any], Any], items: Any, batch_size: int) -> Any:
    """`fn` over `items` in fixed-size batches (last one padded), outputs concatenated.

    Args:
      fn: maps a `[batch_size, ...]` pytree to a pytree of arrays with a
        leading batch axis.
      items: pytree of `[N, ...]` inputs.
      batch_size: compiled batch size.

    Returns:
      `fn`'s pytree with leading axis `N`, as numpy arrays.
    """
    outs = []
    total = batch_size_of(items)
    for start in range(0, total, batch_size):
        size = min(batch_size, total - start)
        # Pad by repeating the last item: every call sees the compiled shape.
        index = np.minimum(np.arange(start, start + batch_size), start + size - 1)
        out = fn(take(items, index))
        outs.append(jax.tree_util.tree_map(lambda x, s=size: np.asarray(x[:s]), out))
    return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs, axis=0), *outs)


def _on_host(tree: Any) -> Any:
    """Numpy leaves: the refiner then checks the values on the host (clear errors)."""
    return jax.tree_util.tree_map(np.asarray, tree)


def stream_order(count: int) -> np.ndarray:
    """The fixed order (seed 0) in which the online variant sees a test set."""
    return np.random.default_rng(0).permutation(count)


def score_features(
    detector: Detector,
    state: DetectorState,
    test_features: Any,
    config: Any,
    batch_size: int,
    online: dict[str, int] | None = None,
):
    """The detector's scores over a test set in compiled batches, or the online scan.

    Args:
      detector: a library detector.
      state: its `fit_features` output.
      test_features: `[T, ...]` features (a pytree for CLIP).
      config: the detector's scoring config.
      batch_size: compiled batch size (offline).
      online: `capacity` and `add_per_query` for the online variant, which
        sees the test set in `stream_order`; None for offline scoring.

    Returns:
      The detector's output with numpy leaves of leading axis `T`, in test-set order.
    """
    if online is None:
        return batched(
            lambda x: detector.score_features(state, _on_host(x), config),
            test_features,
            batch_size,
        )
    order = stream_order(batch_size_of(test_features))
    out = detector.score_stream(state, take(test_features, order), config, **online)
    inverse = np.argsort(order)
    return jax.tree_util.tree_map(lambda x: np.asarray(x)[inverse], out)


@dataclasses.dataclass
class ScoreResult:
    """Scores of one method on the test set.

    Attributes:
      image_scores: `[T]`.
      maps: `[T, S, S]` anomaly maps at the evaluation resolution.
      diagnostics: name -> `[T]` per-image numerical diagnostics.
      metrics: the protocol's metrics, filled in by the runner.
    """

    image_scores: np.ndarray
    maps: np.ndarray
    diagnostics: dict[str, np.ndarray]
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


class Host:
    """One detector, its parameters and a compiled batch size.

    Attributes:
      detector: the library detector.
      params: its parameters (backbone variables or CLIP params).
      batch_size: compiled batch size of features and scores.
      family: the detector's family (`"patchcore"` or `"winclip"`).
      image_size: input side of the detector.
      alpha: the detector's coreset ratio (its default unless overridden).
    """

    def __init__(self, detector: Detector, params: Any, batch_size: int):
        self.detector, self.params, self.batch_size = detector, params, batch_size
        self.family = detector.family
        self.image_size = detector.image_size
        self.resample = detector.resample
        self.alpha = detector.alpha
        self.context = None

    def describe(self) -> dict[str, Any]:
        """What the results should record about the features."""
        return self.detector.describe()

    def prepare(self, category: str) -> None:
        """Per-category set-up (WinCLIP: the class prompts' text embeddings)."""
        self.context = self.detector.prepare(self.params, category)

    def features(self, images: np.ndarray) -> Any:
        """`[N, S, S, 3]` uint8 -> features with leading axis N (a pytree for CLIP)."""
        return batched(lambda x: self.detector.features(self.params, x), images, self.batch_size)

    def fit(self, support_features: Any) -> DetectorState:
        """The detector's state from the support features (banks, calibration)."""
        self.support = support_features  # a method with other refinement settings recalibrates
        return self.detector.fit_features(support_features, alpha=self.alpha, context=self.context)

    def calibrated_state(self, state: DetectorState, config: Any) -> DetectorState:
        """`state` with the calibration of `config`'s refinement (PatchCore+/WinCLIP+ ablations)."""
        refine = getattr(config, "refine", config)  # WinCLIP's refinement settings
        if (
            state.calibration is None
            or not getattr(refine, "use_refinement", False)
            or not refine.calibrated
            or config == self.detector.config()
        ):
            return state
        cal = self.detector.calibrate(self.support, config, alpha=self.alpha)
        return state._replace(calibration=cal)

    def config(self, fields: dict[str, Any], method: Method) -> Any:
        """The detector's scoring config: its defaults, then `fields`, then the method's."""
        return self.detector.config(**{**fields, **method.overrides, **method.host_options})

    def score(
        self,
        state: DetectorState,
        test_features: Any,
        method: Method,
        config: Any,
        online: dict[str, int],
    ) -> ScoreResult:
        """Scores every test image with `method`.

        Args:
          state: the detector's state (`fit`).
          test_features: `[T, ...]` features.
          method: the method (its overrides are already in `config`).
          config: the detector's scoring config.
          online: `capacity` and `add_per_query` of the online variant.

        Returns:
          Scores and maps in test-set order.
        """
        out = score_features(
            self.detector,
            self.calibrated_state(state, config),
            test_features,
            config,
            self.batch_size,
            online if method.online else None,
        )
        diags = {k: np.asarray(v) for k, v in out.diagnostics._asdict().items()}
        return ScoreResult(np.asarray(out.image_scores), np.asarray(out.maps), diags)
