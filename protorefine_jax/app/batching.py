"""A library detector in fixed-size batches: what eval, study and bench run.

`BatchedDetector` holds one detector of `protorefine_jax.detectors` (PatchCore(+) or
WinCLIP(+)) with its parameters and a compiled batch size; it pads batches to
that size so every batch reuses one compiled program. Nothing here knows
which detector it holds. With a device mesh (`device_mesh`, the eval's
`--devices`) every batch is split over the devices on its first axis and the
parameters and the detector state are replicated (`protorefine_jax.sharding`):
the same compiled programs, data parallel.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from protorefine_jax import calibration, stream_calibration, threshold
from protorefine_jax.app.methods import Method
from protorefine_jax.detectors import Detector, DetectorState
from protorefine_jax.padding import fixed_batches
from protorefine_jax.scoring import maps_of_grids
from protorefine_jax.sharding import batch_mesh, replicate, shard_batch

# XLA's option that splits the CPU into this many host devices (read when JAX starts). The
# command line sets it (`cli.common.request_host_devices`); this layer only names it.
HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def device_mesh(count: int, batch_size: int) -> Mesh | None:
    """The mesh a run's batches are split over: `count` local devices (0: all).

    Args:
      count: number of local devices, or 0 for all of them.
      batch_size: the compiled batch size, which the devices must divide.

    Returns:
      A 1-D batch mesh, or None for one device (nothing is placed then).
    """
    if count < 0:
        raise ValueError(f"--devices must be >= 0 (0 = all local devices), got {count}.")
    devices = jax.local_devices()
    count = count or len(devices)
    if count > len(devices):
        raise ValueError(
            f"--devices={count} but JAX sees {len(devices)} local {jax.default_backend()} "
            f"device(s). On CPU, start the process with XLA_FLAGS={HOST_DEVICES_FLAG}={count} "
            "(the eval command line sets it itself when it is the first to start JAX)."
        )
    if count == 1:
        return None
    if batch_size % count:
        raise ValueError(
            f"--batch_size={batch_size} does not split over {count} devices; pass a multiple "
            f"of {count} (e.g. --batch_size={count * -(-batch_size // count)})."
        )
    return batch_mesh(devices[:count])


def replicate_arrays(tree: Any, mesh: Mesh | None) -> Any:
    """`tree` with every array leaf on every device of `mesh` (other leaves as they are)."""
    if mesh is None:
        return tree
    return jax.tree_util.tree_map(
        lambda x: replicate(x, mesh) if isinstance(x, (jax.Array, np.ndarray)) else x, tree
    )


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


def batched(fn: Callable[[Any], Any], items: Any, batch_size: int, mesh: Mesh | None = None) -> Any:
    """`fn` over `items` in fixed-size batches (`padding.fixed_batches`), outputs concatenated.

    Args:
      fn: maps a `[batch_size, ...]` pytree to a pytree of arrays with a
        leading batch axis.
      items: pytree of `[N, ...]` inputs.
      batch_size: compiled batch size.
      mesh: devices each batch is split over (None: as `take` leaves it).

    Returns:
      `fn`'s pytree with leading axis `N`, as numpy arrays.
    """
    outs = []
    for chunk, size in fixed_batches(items, batch_size):
        if mesh is not None:
            chunk = jax.tree_util.tree_map(lambda x: shard_batch(x, mesh), chunk)
        out = fn(chunk)
        outs.append(jax.tree_util.tree_map(lambda x, s=size: np.asarray(x[:s]), out))
    return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs, axis=0), *outs)


def _on_host(tree: Any) -> Any:
    """Numpy leaves: the refiner then checks the values on the host (clear errors)."""
    return jax.tree_util.tree_map(np.asarray, tree)


def normal_gate(scores: calibration.SupportScores) -> float:
    """The normal-only threshold fit derives (5 %): stream images above it are not learnt from."""
    return threshold.from_support_scores(scores, 0.05, 0.0)[0].value


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
    mesh: Mesh | None = None,
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
      mesh: devices each offline batch is split over (`device_mesh`); the
        online scan is sequential and runs on one device.

    Returns:
      The detector's output with numpy leaves of leading axis `T`, in test-set order.
    """
    if online is None and mesh is None:
        return batched(
            lambda x: detector.score_features(state, _on_host(x), config),
            test_features,
            batch_size,
        )
    if online is None:
        placed = replicate_arrays(state, mesh)

        def sharded(x):
            out = detector.score_features(placed, x, config)
            # Device inputs are checked on the device (`inputs_ok`); a bad batch
            # is scored again from the host, whose checks raise the clear error.
            ok = getattr(out, "inputs_ok", None)
            if ok is not None and not np.all(np.asarray(ok)):
                detector.score_features(state, _on_host(x), config)
            return out

        return batched(sharded, test_features, batch_size, mesh)
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
      halves: calibrated PatchCore+ only: the host and refined patch scores
        and the calibration that fused them (`BatchedDetector.halves`).
    """

    image_scores: np.ndarray
    maps: np.ndarray
    diagnostics: dict[str, np.ndarray]
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    halves: dict[str, Any] | None = None


class BatchedDetector:
    """One detector, its parameters and a compiled batch size.

    Attributes:
      detector: the library detector.
      params: its parameters (backbone variables or CLIP params).
      batch_size: compiled batch size of features and scores.
      mesh: devices each batch of features and offline scores is split over
        (`device_mesh`; None: one device).
      family: the detector's family (`"patchcore"` or `"winclip"`).
      image_size: input side of the detector.
      alpha: the detector's coreset ratio (its default unless overridden).
    """

    def __init__(self, detector: Detector, params: Any, batch_size: int, mesh: Mesh | None = None):
        self.detector, self.params, self.batch_size = detector, params, batch_size
        self.mesh = mesh
        self._placed_params = replicate_arrays(params, mesh)
        self.family = detector.family
        self.image_size = detector.image_size
        self.resample = detector.resample
        self.alpha = detector.alpha
        self.context = None
        self.support = None  # the support features of the last `fit`

    def describe(self) -> dict[str, Any]:
        """What the results should record about the features."""
        return self.detector.describe()

    def prepare(self, category: str) -> None:
        """Per-category set-up (WinCLIP: the class prompts' text embeddings)."""
        self.context = self.detector.prepare(self.params, category)

    def features(self, images: np.ndarray) -> Any:
        """`[N, S, S, 3]` uint8 -> features with leading axis N (a pytree for CLIP)."""
        return batched(
            lambda x: self.detector.features(self._placed_params, x),
            images,
            self.batch_size,
            self.mesh,
        )

    def view_features(self, images: np.ndarray) -> Any:
        """`[N, V, ...]` features of the images' nuisance views (None: the detector uses none)."""
        return self.detector.view_features(self._placed_params, images)

    def pseudo_features(self, images: np.ndarray) -> Any:
        """`[n, P, ...]` features of pasted-defect copies of the checked images (None: no check)."""
        return self.detector.pseudo_features(self._placed_params, images)

    def fit(
        self,
        support_features: Any,
        views: Any = None,
        score_support: bool = False,
        pseudo: Any = None,
    ) -> DetectorState:
        """The detector's state from the support features (banks, calibration).

        `score_support` adds the held-out support scores (over the nuisance
        `views` too, when given): the stream method's gate needs them.
        `pseudo`: pasted-defect features of the checked images, for the
        refinement check (`calibration.refinement_check`). A config other
        than the detector's default that needs its own calibration
        (`calibrated_state`) is recalibrated without the check.
        """
        self.support = support_features  # a method with other settings recalibrates from these
        return self.detector.fit_features(
            support_features,
            views=views,
            pseudo=pseudo,
            alpha=self.alpha,
            context=self.context,
            score_support=score_support,
        )

    def calibrated_state(self, state: DetectorState, config: Any) -> DetectorState:
        """`state` with the calibration of `config`'s refinement (PatchCore+/WinCLIP+ ablations)."""
        refine = self.detector.refinement(config)
        if state.calibration is None or not (refine.use_refinement and refine.calibrated):
            return state
        measured = self.detector.refinement(state.calibrated_under)
        if not calibration.config_differences(measured, refine):
            return state
        if self.support is None:
            raise ValueError(
                "this config needs its own calibration, from the support features: "
                "fit the state with BatchedDetector.fit (it keeps them), not with the "
                "detector directly."
            )
        cal = self.detector.calibrate(self.support, config, alpha=self.alpha)
        return state._replace(calibration=cal, calibrated_under=config)

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
        state = self.calibrated_state(state, config)
        if method.stream_calibration:
            return self._score_stream_calibrated(state, test_features, config)
        if self._fuses(state, config) and not method.online:
            return self._score_fused_from_halves(state, test_features, config)
        out = score_features(
            self.detector,
            state,
            test_features,
            config,
            self.batch_size,
            online if method.online else None,
            self.mesh,
        )
        diags = {k: np.asarray(v) for k, v in out.diagnostics._asdict().items()}
        result = ScoreResult(np.asarray(out.image_scores), np.asarray(out.maps), diags)
        if self._fuses(state, config):
            result.halves = self.halves(state, test_features, config)
        return result

    def _fuses(self, state: DetectorState, config: Any) -> bool:
        """Whether `config` scores with the state's calibrated fusion (PatchCore+)."""
        refine = self.detector.refinement(config)
        return (
            self.detector.family == "patchcore"
            and state.calibration is not None
            and refine.use_refinement
            and refine.calibrated
        )

    def _half_outputs(self, state: DetectorState, test_features: Any, config: Any):
        """The host's and the refinement's own outputs over the test set (two passes)."""

        def run(cfg):
            return score_features(
                self.detector, state, test_features, cfg, self.batch_size, mesh=self.mesh
            )

        return run(config.replace(use_refinement=False)), run(config.replace(calibrated=False))

    def halves(self, state: DetectorState, test_features: Any, config: Any) -> dict[str, Any]:
        """Host and refined patch scores `[T, m]` of the test set, and the calibration used."""
        host, refined = self._half_outputs(state, test_features, config)
        return {
            "host": np.asarray(host.patch_scores, np.float64),
            "refined": np.asarray(refined.patch_scores, np.float64),
            "calibration": state.calibration,
        }

    def _score_fused_from_halves(self, state, test_features, config) -> ScoreResult:
        """Calibrated PatchCore+ fused on the host from its two halves' passes.

        The eval reports the calibration error, which needs both halves; the
        fused score is `calibration.fuse` of them (the same float32
        operations as the compiled detector's), its map `maps_of_grids` (the
        same operators as `anomaly_map`), so the refinement runs once per
        image instead of twice. Equal to the compiled fused scores up to
        float32 rounding (tests/test_batching.py).
        """
        host, refined = self._half_outputs(state, test_features, config)
        cal = state.calibration
        grids = np.asarray(
            calibration.fuse(
                jnp.asarray(host.patch_scores, jnp.float32),
                jnp.asarray(refined.patch_scores, jnp.float32),
                cal,
            )
        )
        maps = maps_of_grids(grids, config.grid_shape, config.image_size, config.blur_sigma)
        diags = {k: np.asarray(v) for k, v in refined.diagnostics._asdict().items()}
        result = ScoreResult(grids.max(axis=1), maps, diags)
        result.halves = {
            "host": np.asarray(host.patch_scores, np.float64),
            "refined": np.asarray(refined.patch_scores, np.float64),
            "calibration": cal,
        }
        return result

    def _score_stream_calibrated(self, state, test_features, config) -> ScoreResult:
        """PatchCore+ with statistics updated from the past test images (`stream_calibration`).

        The test set is seen in `stream_order` (the online variant's); image
        `t` is scored with the support statistics and those of images before
        it only. Opt-in research method: it reads unlabelled test images.
        """
        if not self._fuses(state, config) or state.support_scores is None:
            raise ValueError(
                "stream calibration is a PatchCore+ method with a calibrated state from "
                "BatchedDetector.fit(..., score_support=True)."
            )
        halves = self.halves(state, test_features, config)
        support_host, support_refined = calibration.held_out_scores(
            self.support, self.alpha, config, self.detector.extractor.grid
        )
        order = stream_order(len(halves["host"]))
        fused, cals = stream_calibration.calibrate_stream(
            support_host,
            support_refined,
            halves["host"][order],
            halves["refined"][order],
            gate=normal_gate(state.support_scores),
            refined_on=float(state.calibration.refined_on),
        )
        grids = np.empty_like(fused)
        grids[order] = fused
        halves["calibration"] = stream_calibration.in_order(cals, order)
        maps = maps_of_grids(grids, config.grid_shape, config.image_size, config.blur_sigma)
        result = ScoreResult(grids.max(axis=1), maps, {})
        result.halves = halves
        return result
