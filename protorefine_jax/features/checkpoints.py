"""Torch-to-Flax layout conversion shared by the CNN backbones (pure, no file access).

A module layout ``{torch prefix: (kind, in_ch, out_ch, kernel)}`` with kinds
``conv``, ``bn`` and ``dense`` gives the expected state-dict shapes and the Flax
variables. Reading the files lives in :mod:`protorefine_jax.io.torch_checkpoint`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from protorefine_jax.io.errors import CheckpointError

__all__ = ["CheckpointError", "check_state_dict", "layout_shapes", "layout_to_flax", "nested_set"]


def check_state_dict(
    state: Mapping[str, np.ndarray],
    expected: Mapping[str, tuple[int, ...]],
    source: str,
) -> None:
    """Checks that every expected key exists with the expected shape.

    Args:
      state: the loaded state dict.
      expected: ``{key: shape}`` in model order.
      source: the file name to quote in the error.

    Raises:
      CheckpointError: naming ``source`` and the first missing or mismatched key.
    """
    for key, shape in expected.items():
        if key not in state:
            raise CheckpointError(f"{source}: missing key {key!r} (expected shape {shape})")
        if tuple(state[key].shape) != tuple(shape):
            raise CheckpointError(
                f"{source}: key {key!r} has shape {tuple(state[key].shape)}, expected {shape}"
            )


def nested_set(tree: dict, path: tuple[str, ...], leaf: Any) -> None:
    """Sets ``tree[path[0]]...[path[-1]] = leaf``, creating intermediate dicts."""
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = leaf


# ``{torch prefix: (kind, in_ch, out_ch, kernel)}``, kind in {"conv", "bn", "dense"}.
Layout = Mapping[str, tuple[str, int, int, int]]
_BN_KEYS = ("weight", "bias", "running_mean", "running_var")


def layout_shapes(layout: Layout) -> dict[str, tuple[int, ...]]:
    """Torch state-dict keys and shapes of a module layout, in layout order."""
    shapes: dict[str, tuple[int, ...]] = {}
    for prefix, (kind, cin, cout, k) in layout.items():
        if kind == "conv":
            shapes[prefix + ".weight"] = (cout, cin, k, k)
        elif kind == "dense":
            shapes[prefix + ".weight"] = (cout, cin)
            shapes[prefix + ".bias"] = (cout,)
        else:
            for name in _BN_KEYS:
                shapes[f"{prefix}.{name}"] = (cout,)
    return shapes


def layout_to_flax(
    state: Mapping[str, np.ndarray],
    layout: Layout,
    flax_path: Callable[[str], tuple[str, ...]],
    source: str,
) -> dict[str, Any]:
    """Flax ``{"params", "batch_stats"}`` of a torch state dict laid out as ``layout``.

    Convolutions ``[out, in/groups, kh, kw]`` become ``[kh, kw, in/groups, out]``,
    dense ``[out, in]`` becomes ``[in, out]``, batch norms ``scale``/``bias`` and
    ``mean``/``var`` statistics.

    Raises:
      CheckpointError: naming ``source`` and the first missing or mismatched key.
    """
    check_state_dict(state, layout_shapes(layout), source)
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}

    def f32(key: str) -> np.ndarray:
        return np.asarray(state[key], np.float32)

    for prefix, (kind, *_) in layout.items():
        path = flax_path(prefix)
        if kind == "conv":
            kernel = np.transpose(f32(prefix + ".weight"), (2, 3, 1, 0))
            nested_set(params, path + ("kernel",), kernel)
        elif kind == "dense":
            nested_set(params, path + ("kernel",), f32(prefix + ".weight").T)
            nested_set(params, path + ("bias",), f32(prefix + ".bias"))
        else:
            nested_set(params, path + ("scale",), f32(prefix + ".weight"))
            nested_set(params, path + ("bias",), f32(prefix + ".bias"))
            nested_set(stats, path + ("mean",), f32(prefix + ".running_mean"))
            nested_set(stats, path + ("var",), f32(prefix + ".running_var"))
    return {"params": params, "batch_stats": stats}
