"""Input checks, so bad input fails with a clear message.

Shapes are checked before jit. Values (finiteness, the representable range of
`feature_range`) are checked where they enter from the host: numpy arrays and
other host values are checked with numpy before they are sent to the device.
Arrays already on the device are not read back (that would stall a pipelined
caller once per batch): the compiled program computes a per-query
`inputs_ok` flag (`inputs_ok`) that `refine_and_score` returns, and
`raise_if_invalid` turns it into the same clear error on request. Under a jax
transformation (tracers) only shapes are checked.
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


def on_host(x) -> bool:
    """True for values not (yet) on a device: numpy arrays, lists, scalars."""
    return not isinstance(x, jax.Array)


# Largest-entry range of squared-Euclidean features per dtype: the scores are
# squared distances in the features' units and must be representable (beyond
# it they overflow to inf or underflow to exactly 0). Cosine features may have
# any finite scale (rows are normalised exactly, `gram.normalize_rows`).
FEATURE_RANGE = {"float32": (1e-15, 1e15), "float64": (1e-150, 1e150)}


def feature_range(config) -> tuple[float, float] | None:
    """`(lo, hi)` allowed for the largest `|x|` of non-zero features, None if any."""
    if config.distance == "cosine":
        return None
    return FEATURE_RANGE["float64" if config.precision == "float64" else "float32"]


def _range_error(name: str, amax: float, lo: float, hi: float) -> ValueError:
    return ValueError(
        f"{name}: largest |value| {amax:.3g} is outside [{lo:g}, {hi:g}], the range in "
        "which squared-Euclidean scores (squared feature units) are representable. "
        "Multiply bank and queries by one constant (scores scale by its square), or "
        'use precision="float64".'
    )


def check_range(x, name: str, config) -> None:
    """Raise if the largest `|x|` of host array `x` is outside `feature_range`."""
    bounds = feature_range(config)
    if bounds is None or is_traced(x):
        return
    arr = np.asarray(x)
    amax = float(np.max(np.abs(arr))) if arr.size else 0.0
    if amax != 0.0 and not bounds[0] <= amax <= bounds[1]:
        raise _range_error(name, amax, *bounds)


def inputs_ok(bank, queries, config) -> jax.Array:
    """`[B]` in-graph flag: bank and query `b` finite and inside `feature_range`."""
    bank_ok = jnp.all(jnp.isfinite(bank))
    q_ok = jnp.all(jnp.isfinite(queries), axis=(1, 2))
    bounds = feature_range(config)
    if bounds is not None:
        lo, hi = bounds
        amax = jnp.maximum(jnp.max(jnp.abs(bank)), jnp.max(jnp.abs(queries), axis=(1, 2)))
        q_ok &= (amax == 0) | ((amax >= lo) & (amax <= hi))
    return bank_ok & q_ok


def raise_if_invalid(out, bank, queries, config) -> None:
    """Reads `out.inputs_ok` back (one `[B]` bool) and raises the host check's error.

    Args:
      out: `RefineOutput` of `refine_and_score` on device arrays.
      bank: its bank, read back only on failure (for the message).
      queries: its queries, likewise.
      config: the config it ran with.
    """
    if out.inputs_ok is None or bool(np.all(np.asarray(out.inputs_ok))):
        return
    check_finite(np.asarray(bank), "bank")
    check_finite(np.asarray(queries), "queries")
    check_range(np.asarray(bank), "bank", config)
    check_range(np.asarray(queries), "queries", config)
    raise ValueError("bank and queries are each in range but not together; rescale them.")


def check_finite(x, name: str) -> None:
    """Raise if concrete `x` holds NaN or infinite values, saying how many.

    Args:
      x: array to check (skipped when traced). A device array is read back.
      name: argument name for messages.
    """
    if is_traced(x):
        return
    arr = np.asarray(x)
    if arr.dtype.kind not in "fc" or np.isfinite(arr).all():
        return
    bad = ~np.isfinite(arr)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name} contains {int(bad.sum())} NaN or infinite values (first at index {first}). "
            "Check the feature extractor input (corrupt or all-constant images, wrong "
            "normalisation) or the checkpoint; refinement on non-finite features is meaningless."
        )


def check_dtype(x, name: str) -> None:
    """Real floating or integer features only (float16/bfloat16 are upcast)."""
    dtype = np.dtype(x.dtype)
    if dtype.kind not in "fiu" and dtype.name != "bfloat16":
        raise ValueError(f"{name} must hold real numbers, got dtype {dtype}.")


def check_bank_and_queries(bank, queries, config=None) -> None:
    """Shape checks, and value checks of host inputs, for `refine_and_score`.

    Args:
      bank: `[n, c]` prototypes.
      queries: `[B, m, c]` query patch features.
      config: the `RefineConfig` (sets the allowed feature range), or None to
        check finiteness only.
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
    check_dtype(bank, "bank")
    check_dtype(queries, "queries")
    for x, name in ((bank, "bank"), (queries, "queries")):
        if on_host(x):
            check_finite(x, name)
            if config is not None:
                check_range(x, name, config)
