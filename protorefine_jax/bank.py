"""The memory bank: coreset prototypes plus a check for the degenerate regime.

When the bank spans the whole feature space the support patches span
(n >= feature rank), the least-squares step `W0 M` reproduces every query
patch exactly, anomalies included, and refinement collapses (docs/method.md,
"The ridge rule"). That is decided once, where the bank is built, and
reported in `MemoryBank.degenerate`; `uses_wide_ridge` is the static-shape
rule the refinement applies.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from protorefine_jax import checks
from protorefine_jax.coreset import greedy_coreset


class MemoryBank(NamedTuple):
    """Prototypes `M` and what is known about their span.

    Attributes:
      prototypes: `[n, c]` unprojected support rows chosen by the coreset.
      indices: `[n]` their rows in the stacked support features.
      bank_rank: numerical rank of `prototypes`.
      feature_rank: numerical rank of all support features `[N, c]`.
      degenerate: `bank_rank >= feature_rank`: span(M) holds every direction
        the normal features use, so the least-squares step reconstructs any
        query patch (anomalies too) and refinement cannot separate them.
    """

    prototypes: Float[Array, "n c"]
    indices: Int[Array, " n"]
    bank_rank: int
    feature_rank: int
    degenerate: bool

    def describe(self) -> str:
        """One line for logs: size, ranks and the degeneracy verdict."""
        n, c = self.prototypes.shape
        line = f"bank n={n}, c={c}, rank(M)={self.bank_rank}, rank(support)={self.feature_rank}"
        if self.degenerate:
            line += (
                " -- DEGENERATE: the bank spans the support features, so W0 M reproduces"
                ' every query patch (docs/method.md, "The ridge rule"); RefineConfig.ridge_wide'
                " applies where n >= c; else lower alpha or use wider features"
            )
        return line


def prototypes_of(bank: MemoryBank | Float[Array, "n c"]) -> Float[Array, "n c"]:
    """The `[n, c]` prototypes of a bank given as a `MemoryBank` or as the array itself."""
    return bank.prototypes if isinstance(bank, MemoryBank) else bank


def uses_wide_ridge(rows, feature_dim):
    """The ridge rule: does a bank of `rows` prototypes take `RefineConfig.ridge_wide`?

    A bank with at least as many (non-empty) rows as feature dimensions,
    `n >= c`, has a singular Gram matrix and takes the larger relative ridge
    `ridge_wide`; a narrower bank takes `ridge` (docs/method.md, "The ridge
    rule"). `n >= c` is the static-shape proxy of `MemoryBank.degenerate`.
    Works on Python ints (to plan runs) and on traced counts (inside jit).

    Args:
      rows: prototypes in use `n` (int or scalar array).
      feature_dim: feature dimension `c`.

    Returns:
      `rows >= feature_dim` (bool or bool array).
    """
    return rows >= feature_dim


def numerical_rank(x: Float[Array, "N c"], rtol: float = 1e-3) -> int:
    """Rank of `x` counting singular values above `rtol * sigma_max`.

    The tolerance is loose on purpose: deep features are never exactly
    rank-deficient in float32, but directions 1000x weaker than the strongest
    carry no usable signal for the reconstruction.

    Args:
      x: `[N, c]` matrix.
      rtol: relative singular-value threshold.

    Returns:
      The numerical rank.
    """
    x64 = np.asarray(x, np.float64)
    # Eigenvalues of the smaller Gram matrix: cheap for N >> c.
    gram = x64.T @ x64 if x64.shape[0] >= x64.shape[1] else x64 @ x64.T
    eig = np.clip(np.linalg.eigvalsh(gram), 0.0, None)
    sv = np.sqrt(eig)
    if sv.max() == 0.0:
        return 0
    return int(np.sum(sv > rtol * sv.max()))


def build_bank(
    support_features: Float[Array, "... c"],
    alpha: float,
    *,
    projection_dim: int = 128,
    seed: int = 0,
    start_index: int = 0,
    rank_rtol: float = 1e-3,
) -> MemoryBank:
    """Greedy-coreset memory bank from support patch features (docs/method.md, "Objects").

    Args:
      support_features: `[k, m, c]` or `[N, c]` patch features of the normal
        support images.
      alpha: coreset ratio in `(0, 1]`.
      projection_dim: JL dimension of the coreset distances.
      seed: projection seed.
      start_index: first coreset row.
      rank_rtol: relative tolerance of the rank check.

    Returns:
      The bank with its degeneracy verdict.
    """
    feats = checks.as_feature_matrix(support_features, "support_features")
    checks.check_finite(feats, "support_features")
    idx = greedy_coreset(
        feats, alpha, projection_dim=projection_dim, seed=seed, start_index=start_index
    )
    protos = jnp.take(feats, idx, axis=0)
    bank_rank = numerical_rank(protos, rank_rtol)
    feature_rank = numerical_rank(feats, rank_rtol)
    return MemoryBank(
        prototypes=protos,
        indices=idx,
        bank_rank=bank_rank,
        feature_rank=feature_rank,
        degenerate=bank_rank >= feature_rank,
    )
