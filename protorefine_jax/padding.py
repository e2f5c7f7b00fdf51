"""Fixed-size batches: axis 0 padded by repeating its last row.

A jitted program compiles once per input shape. Every loop that feeds images
or features to one in batches (eval, fit, predict, the device mesh) pads the
last, short batch to the compiled size with copies of its last row, so every
call reuses one program, and cuts the outputs back to the real rows. The
padding rows are real inputs (no zeros the refiner would have to mask) whose
outputs are thrown away: per-query scoring gives every real row the same
numbers with or without them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def pad_to(tree: Any, size: int) -> Any:
    """`tree` with axis 0 of every leaf padded to `size` rows by repeating its last row.

    Numpy leaves stay numpy (padded on the host), JAX arrays stay on their device.

    Args:
      tree: pytree of arrays `[n, ...]`, one `n >= 1` for all leaves.
      size: rows wanted, `>= n`.

    Returns:
      The pytree with leaves `[size, ...]` (the leaves themselves where `n == size`).
    """
    leaves = jax.tree_util.tree_leaves(tree)
    n = len(leaves[0]) if leaves else 0
    if any(len(x) != n for x in leaves):
        raise ValueError(f"leaves of unequal leading size {sorted({len(x) for x in leaves})}.")
    if n == size:
        return tree
    if n == 0 or n > size:
        raise ValueError(f"cannot pad {n} row(s) to {size}: need 1 <= rows <= {size}.")

    def pad(x):
        xp = jnp if isinstance(x, jax.Array) else np
        return xp.concatenate([x, xp.repeat(x[-1:], size - n, axis=0)], axis=0)

    return jax.tree_util.tree_map(pad, tree)


def pad_to_multiple(tree: Any, multiple: int) -> tuple[Any, int]:
    """`(pad_to(tree, m), n)`: the `n` rows padded to `m`, the next multiple of `multiple`."""
    n = len(jax.tree_util.tree_leaves(tree)[0])
    return pad_to(tree, n + (-n) % multiple), n


def fixed_batches(tree: Any, batch_size: int) -> Iterator[tuple[Any, int]]:
    """Consecutive batches of exactly `batch_size` rows of axis 0, the last one padded.

    Args:
      tree: pytree of arrays `[N, ...]` (numpy or JAX).
      batch_size: the compiled batch size.

    Yields:
      `(batch, n)`: the pytree with leaves `[batch_size, ...]` and the number
      `n` of its rows that are real (the first `n`; the rest repeat row `n - 1`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    total = len(jax.tree_util.tree_leaves(tree)[0])
    for start in range(0, total, batch_size):
        chunk = jax.tree_util.tree_map(lambda x, s=start: x[s : s + batch_size], tree)
        n = min(batch_size, total - start)
        yield pad_to(chunk, batch_size), n
