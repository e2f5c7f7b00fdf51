"""Serialise a compiled `detect` with `jax.export`, weights and bank baked in.

The artifact is a StableHLO program: reloading it needs jax alone, none of
this package's model-building code (`jax.export.deserialize(blob).call(images)`).
The batch size is symbolic, so one artifact serves any batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import export

from protorefine_jax.config import RefineConfig


def export_detect(
    detect: Callable[..., Any],
    params: Any,
    bank: jax.Array,
    config: RefineConfig,
    image_shape: tuple[int, int, int],
    *,
    dtype: Any = jnp.float32,
    platforms: tuple[str, ...] | None = None,
) -> bytes:
    """Serialise `images -> (image_scores, maps, patch_scores)` for fixed weights.

    Args:
      detect: `detect(params, bank, images, config) -> RefineOutput`, e.g.
        from `make_detect`.
      params: backbone parameters (become constants of the program).
      bank: `[n, c]` prototypes (a constant too).
      config: refinement settings (static and traced fields both frozen).
      image_shape: `(H, W, 3)` of one input image; the batch axis is symbolic.
      dtype: input dtype (raw pixels in [0, 255]).
      platforms: lowering platforms, e.g. `("cpu", "cuda")`; the current
        backend when None.

    Returns:
      The serialised artifact (write it with `open(path, "wb")`).
    """

    def fn(images):
        out = detect(params, bank, images, config)
        return out.image_scores, out.maps, out.patch_scores

    shape = export.symbolic_shape("b, {}, {}, {}".format(*image_shape))
    exported = export.export(jax.jit(fn), platforms=platforms)(jax.ShapeDtypeStruct(shape, dtype))
    return exported.serialize()


def load_detect(blob: bytes) -> Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array]]:
    """Reload an artifact of `export_detect` as `images -> (scores, maps, patch_scores)`."""
    return export.deserialize(bytearray(blob)).call
