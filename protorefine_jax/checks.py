"""Input checks that run before jit, so bad input fails with a clear message.

Under a jax transformation (tracers) the value checks are skipped: shapes are
still checked, but NaNs cannot be seen until the values exist.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def is_traced(x) -> bool:
    """True when `x` is a tracer (inside jit/vmap/grad of the caller)."""
    return isinstance(x, jax.core.Tracer)


def as_feature_matrix(x, name: str):
    """`[N, c]` view of `[..., c]` features; rejects empty or 1-D input.

    Args:
      x: array of rank >= 2.
      name: argument name for messages.

    Returns:
      `[N, c]` array (reshape of `x`).
    """
    x = x if is_traced(x) else jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape [..., c] with rank >= 2, got shape {x.shape}.")
    x = x.reshape(-1, x.shape[-1])
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {x.shape}): the bank needs at least one row.")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has feature dimension 0 (shape {x.shape}).")
    return x


@jax.jit
def _all_finite(x) -> jax.Array:
    return jnp.all(jnp.isfinite(x))


def check_finite(x, name: str) -> None:
    """Raise if concrete `x` holds NaN or infinite values, saying how many.

    Args:
      x: array to check (skipped when traced).
      name: argument name for messages.
    """
    if is_traced(x):
        return
    # One boolean leaves the device; the array itself only on failure.
    if bool(_all_finite(x)):
        return
    arr = np.asarray(x)
    bad = ~np.isfinite(arr)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name} contains {int(bad.sum())} NaN or infinite values (first at index {first}). "
            "Check the feature extractor input (corrupt or all-constant images, wrong "
            "normalisation) or the checkpoint; refinement on non-finite features is meaningless."
        )


def prototypes_of(bank):
    """The `[n, c]` array of a bank given as an array or a `MemoryBank`."""
    return bank.prototypes if hasattr(bank, "prototypes") else bank


def check_bank_and_queries(bank, queries) -> None:
    """Shape and value checks for `refine_and_score`.

    Args:
      bank: `[n, c]` prototypes.
      queries: `[B, m, c]` query patch features.
    """
    if bank.ndim != 2:
        raise ValueError(f"bank must have shape [n, c], got shape {bank.shape}.")
    if bank.shape[0] == 0:
        raise ValueError(
            "bank is empty (n = 0): build it with build_bank() from at least one support image."
        )
    if queries.ndim != 3:
        raise ValueError(
            f"queries must have shape [B, m, c], got shape {queries.shape}; "
            "add a batch axis for a single query (queries[None])."
        )
    if queries.shape[0] == 0 or queries.shape[1] == 0:
        raise ValueError(f"queries is empty (shape {queries.shape}).")
    if bank.shape[1] != queries.shape[2]:
        raise ValueError(
            f"feature dimension mismatch: bank has c={bank.shape[1]} but queries have "
            f"c={queries.shape[2]}. Build the bank and the queries with the same extractor "
            "and aggregation."
        )
    check_finite(bank, "bank")
    check_finite(queries, "queries")
