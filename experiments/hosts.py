"""Host methods for the eval CLI: feature extraction, banks and scoring per family.

A host turns decoded images into features, support features into a bank, and
test features into image scores and maps for one `Method`. The CNN host wraps
`protorefine_jax.features` + `refine_and_score`; the CLIP host wraps
`protorefine_jax.clip.winclip`. Both pad batches to a fixed size so every
batch reuses one compiled program.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.methods import Method
from protorefine_jax import RefineConfig, build_bank, online_refine_and_score, refine_and_score
from protorefine_jax.features import get_extractor


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


def stream_order(count: int) -> np.ndarray:
    """The fixed order (seed 0) in which the online variant sees a test set."""
    return np.random.default_rng(0).permutation(count)


def score_features(
    protos,
    test_features: np.ndarray,
    config: RefineConfig,
    batch_size: int,
    online: dict[str, int] | None = None,
):
    """`refine_and_score` over a test set in compiled batches, or the online scan.

    Args:
      protos: `[n, c]` bank prototypes.
      test_features: `[T, m, c]`.
      config: refinement settings.
      batch_size: compiled batch size (offline).
      online: `capacity` and `add_per_query` for the online variant, which
        sees the test set in `stream_order`; None for offline scoring.

    Returns:
      `RefineOutput` with numpy leaves of leading axis `T`, in test-set order.
    """
    if online is None:
        return batched(
            lambda x: refine_and_score(protos, np.asarray(x), config), test_features, batch_size
        )
    order = stream_order(len(test_features))
    out = online_refine_and_score(protos, jnp.asarray(test_features[order]), config, **online)
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


class PatchCoreHost:
    """PatchCore / PatchCore+ on a CNN backbone with PatchCore aggregation."""

    family = "patchcore"

    def __init__(
        self,
        backbone: str,
        aggregation: str,
        image_size: int,
        weights: str,
        batch_size: int,
        pretrain_dim: int | None = None,
        target_dim: int | None = None,
    ):
        self.extractor = get_extractor(
            backbone, aggregation, image_size, pretrain_dim=pretrain_dim, target_dim=target_dim
        )
        if weights == "random":
            self.params = self.extractor.init_params(jax.random.PRNGKey(0))
        else:
            self.params = self.extractor.load_params(weights or None)
        self.image_size = image_size
        self.batch_size = batch_size

    def describe(self) -> dict[str, Any]:
        """What the results should record about the features."""
        ex = self.extractor
        return {
            "backbone": ex.name,
            "aggregation": ex.aggregation,
            "feature_dim": ex.feature_dim,
            "grid": list(ex.grid),
            "image_size": ex.image_size,
        }

    def prepare(self, category: str) -> None:
        """Per-category set-up (none for CNN features)."""
        del category

    def features(self, images: np.ndarray) -> np.ndarray:
        """`[N, S, S, 3]` uint8 -> `[N, m, c]` float32 patch features."""
        return batched(lambda x: self.extractor.extract(self.params, x), images, self.batch_size)

    def build_bank(self, support_features: np.ndarray, alpha: float):
        """Greedy-coreset bank of the support patches (with its degeneracy check)."""
        return build_bank(jnp.asarray(support_features), alpha)

    def base_config(self, **fields) -> RefineConfig:
        """`RefineConfig` for this host's grid and map size, plus `fields`."""
        s = self.image_size
        return RefineConfig(
            distance="sqeuclidean", grid_shape=self.extractor.grid, image_size=(s, s), **fields
        )

    def score(
        self,
        bank,
        test_features: np.ndarray,
        method: Method,
        config: RefineConfig,
        online: dict[str, int],
    ) -> ScoreResult:
        """Scores every test image with `method`.

        Args:
          bank: the `MemoryBank`.
          test_features: `[T, m, c]`.
          method: the method (its overrides are already in `config`).
          config: refinement settings.
          online: `capacity` and `add_per_query` of the online variant.

        Returns:
          Scores and maps in test-set order.
        """
        out = score_features(
            bank.prototypes,
            test_features,
            config,
            self.batch_size,
            online if method.online else None,
        )
        diags = {k: np.asarray(v) for k, v in out.diagnostics._asdict().items()}
        return ScoreResult(np.asarray(out.image_scores), np.asarray(out.maps), diags)
