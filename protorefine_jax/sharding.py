"""Data parallelism over local devices: the query batch sharded, the bank replicated.

The computation is the same jitted program as on one device; only the input
placement changes (`jax.sharding.NamedSharding` on the batch axis), and XLA
partitions the vmapped refinement, which has no cross-query communication.

Multi-host: call `jax.distributed.initialize()` on every host first (see the
README's GPU section); `batch_mesh(jax.devices())` then spans all hosts' devices
and each host feeds its slice of the batch through
`jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from protorefine_jax.padding import pad_to_multiple

BATCH_AXIS = "batch"


def batch_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named `"batch"` over `devices` (default: all local devices)."""
    devices = jax.local_devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (BATCH_AXIS,))


def shard_batch(x, mesh: Mesh):
    """Place `x` with its leading axis split over the mesh's batch axis."""
    spec = P(BATCH_AXIS, *([None] * (x.ndim - 1)))
    return jax.device_put(x, NamedSharding(mesh, spec))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every array of `tree` whole on every device of the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def run_sharded(
    fn: Callable[..., Any], args: tuple, batch_argnum: int, mesh: Mesh | None = None
) -> Any:
    """`fn(*args)` with `args[batch_argnum]` split on axis 0 over the mesh.

    The other arguments (params, bank, config) are replicated. The batch is
    padded to a multiple of the device count and every output leaf (all lead
    with the batch axis) is cut back to the original size.

    Args:
      fn: a jitted function, e.g. `refine_and_score` or a `detect`.
      args: its positional arguments.
      batch_argnum: which argument is the `[B, ...]` batch.
      mesh: the mesh; all local devices when None.

    Returns:
      `fn`'s output, first axis of every leaf of size `B`.
    """
    mesh = batch_mesh() if mesh is None else mesh
    batch = args[batch_argnum]
    # Pad on the host when the batch is there: each device then receives only
    # its own slice, and nothing else carries a copy of the whole batch.
    padded, size = pad_to_multiple(
        batch if isinstance(batch, jax.Array) else np.asarray(batch), mesh.size
    )
    rest = args[:batch_argnum] + args[batch_argnum + 1 :]
    placed = list(replicate(rest, mesh))
    placed.insert(batch_argnum, shard_batch(padded, mesh))
    out = fn(*placed)
    return jax.tree_util.tree_map(lambda leaf: leaf[:size], out)
