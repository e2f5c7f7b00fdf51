"""Serialise a compiled `detect` with `jax.export`, weights and bank baked in.

The artifact is a StableHLO program: reloading it needs jax alone, none of
this package's model-building code (`jax.export.deserialize(blob).call(images)`).
The batch size is symbolic, so one artifact serves any batch.

Loading an artifact is running code: the program it holds is compiled and
executed as is, with whatever it computes. Load artifacts from a trusted
source only (pin them with `expected_sha256`). `load_detect` validates what
can be validated before anything runs: the blob parses (a corrupt blob is an
`ExportError`, not a `struct.error`), its calling-convention version is one
this jax supports, it was lowered for the current platform, and its input /
output signature is the one `export_detect` writes (`[b, H, W, 3]` images
in, three outputs), with `(H, W, 3)` equal to `image_shape` when given.
"""

from __future__ import annotations

import hashlib
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
    calibration: Any = None,
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
      calibration: the support-set score calibration of the detector state
        (`DetectorState.calibration`, a constant of the program like the
        bank); None scores uncalibrated.

    Returns:
      The serialised artifact (write it with `open(path, "wb")`).
    """

    def fn(images):
        if calibration is None:
            out = detect(params, bank, images, config)
        else:
            out = detect(params, bank, images, config, calibration)
        return out.image_scores, out.maps, out.patch_scores

    shape = export.symbolic_shape("b, {}, {}, {}".format(*image_shape))
    exported = export.export(jax.jit(fn), platforms=platforms)(jax.ShapeDtypeStruct(shape, dtype))
    return exported.serialize()


class ExportError(ValueError):
    """A `jax.export` artifact is corrupt, from another platform, or not a `detect`."""


def _platform() -> str:
    backend = jax.default_backend()
    if backend == "gpu":
        return "rocm" if "rocm" in jax.devices()[0].client.platform_version.lower() else "cuda"
    return backend


def load_detect(
    blob: bytes,
    image_shape: tuple[int, int, int] | None = None,
    expected_sha256: str | None = None,
) -> Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array]]:
    """Reload an artifact of `export_detect` as `images -> (scores, maps, patch_scores)`.

    The artifact's program runs as is: load artifacts from trusted sources only.

    Args:
      blob: the bytes `export_detect` returned.
      image_shape: `(H, W, 3)` the caller will feed; checked against the
        artifact's input signature. None skips that check.
      expected_sha256: hex digest the blob must have (checked first).

    Raises:
      ExportError: digest mismatch, a blob that does not parse, an
        unsupported version, another platform or an unexpected signature.
    """
    if not isinstance(blob, (bytes, bytearray, memoryview)) or len(blob) == 0:
        raise ExportError("empty or non-bytes jax.export artifact.")
    if expected_sha256 is not None:
        digest = hashlib.sha256(blob).hexdigest()
        if digest != expected_sha256.lower():
            raise ExportError(
                f"artifact sha256 {digest} differs from the expected {expected_sha256}: "
                "not the artifact you trust. Fix: re-fetch it from its trusted source."
            )
    try:
        exported = export.deserialize(bytearray(blob))
        exported.mlir_module()  # parses the program: corrupt bytecode fails here, not at call
    except Exception as e:  # flatbuffers / MLIR raise struct.error, TypeError, ValueError, ...
        raise ExportError(
            f"not a valid jax.export artifact ({type(e).__name__}: {str(e)[:200]}). Fix: "
            "re-export it with protorefine_jax.export.export_detect."
        ) from e
    lo = export.minimum_supported_calling_convention_version
    hi = export.maximum_supported_calling_convention_version
    if not lo <= exported.calling_convention_version <= hi:
        raise ExportError(
            f"artifact calling-convention version {exported.calling_convention_version} is "
            f"outside [{lo}, {hi}] supported by jax {jax.__version__}. Fix: re-export it."
        )
    platform = _platform()
    if platform not in exported.platforms:
        raise ExportError(
            f"artifact was lowered for {list(exported.platforms)}, not for {platform}. Fix: "
            f"re-export with platforms=({platform!r}, ...)."
        )
    ins, outs = exported.in_avals, exported.out_avals
    if len(ins) != 1 or len(ins[0].shape) != 4 or ins[0].shape[-1] != 3 or len(outs) != 3:
        raise ExportError(
            f"artifact signature {[a.str_short() for a in ins]} -> "
            f"{[a.str_short() for a in outs]} is not a detect program (images [b, H, W, 3] -> "
            "scores, maps, patch_scores)."
        )
    if image_shape is not None and tuple(ins[0].shape[1:]) != tuple(image_shape):
        raise ExportError(
            f"artifact takes images of shape {tuple(ins[0].shape[1:])}, not {tuple(image_shape)}."
        )
    return exported.call
