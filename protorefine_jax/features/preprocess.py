"""Image preprocessing at the data edge (numpy / PIL, outside jit, no file I/O).

Images are resized to a square without cropping (FastRef Sec. 6.1: 256 x 256)
and brought to 3-channel RGB pixels in [0, 255]. Per-backbone normalisation is
not done here: it happens inside each extractor's jitted ``extract``.

This module is the ONE implementation of "to RGB + resize": the dataset
readers (``protorefine_jax.data.imageio``) decode a file with PIL, turn it into
an array with :func:`pil_to_array` and call :func:`resize_rgb`, so a file read
by the data package and the same image passed here as an array or a PIL image
give the same pixels. The rules:

- uint8: used as is. bool (PIL mode ``"1"``): False -> 0, True -> 255.
- uint16 (16-bit PNG / TIFF; PIL modes ``"I;16*"`` and ``"I"``, see
  :func:`pil_to_array`): divided by :data:`UINT16_SCALE` = 257 and rounded to
  uint8 (65535 -> 255 exactly; this is the full-range 16 -> 8 bit map, not the
  high byte).
- float: multiplied by ``float_scale`` (255 for the scikit-image convention
  [0, 1], 1.0 for floats already in [0, 255]); values outside [0, 255] after
  scaling are an error. Float images stay float32 (no quantisation).
- channels: grayscale ``[H, W]`` / ``[H, W, 1]`` is replicated to 3 channels;
  the alpha channel of gray+alpha / RGBA is dropped, not composited (as
  ``PIL.Image.convert("RGB")`` does); other PIL modes (palette, CMYK, ...) go
  through ``convert("RGB")``.
- resize: PIL BILINEAR straight to ``size x size`` (no crop, aspect ratio not
  kept), which antialiases when shrinking as torchvision's ``Resize`` on PIL
  images does in the PatchCore reference code. uint8 images use PIL's uint8
  path; float images are resized per channel in PIL's 32-bit float mode with
  the same filter.
- ``resample="bicubic"`` (the CLIP / WinCLIP input, as anomalib's WinCLIP
  ``Resize((240, 240), bicubic, antialias=True)`` on float tensors): every
  image is resized per channel in PIL's 32-bit float mode with BICUBIC (Keys
  cubic, a = -0.5, support widened by the shrink factor: the antialiased
  bicubic torch's ``interpolate(..., antialias=True)`` implements), without
  rounding or clamping in between; the float result is then clipped to
  [0, 255] and, for integer input, rounded to uint8 (the data edge stores
  uint8). That last step is the only difference from anomalib's unclipped
  float pixels (at most 0.5 grey level, plus the bicubic overshoot at sharp
  edges). Tested against a float64 numpy implementation of the kernel
  (``tests/test_features_preprocess_bicubic.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

ImageLike = np.ndarray | Image.Image

UINT16_SCALE = 257
"""Divisor mapping 16-bit samples onto [0, 255] (65535 / 255)."""

_UINT16_MAX = 65535


def pil_to_array(image: Image.Image) -> np.ndarray:
    """Decoded PIL image -> array in the dtypes :func:`to_rgb` knows.

    - ``"1"`` -> bool; ``"L"``, ``"LA"``, ``"RGB"``, ``"RGBA"`` -> uint8 as stored.
    - ``"I;16"``, ``"I;16B"``, ``"I;16L"``, ``"I;16N"`` -> uint16.
    - ``"I"`` (PIL's 32-bit integer container, which older Pillow uses for
      16-bit grayscale PNG and which 16-bit TIFFs may open as) -> uint16: the
      samples are taken as 16-bit, so they must lie in [0, 65535].
    - ``"F"`` (32-bit float) -> float32 (scaled by ``float_scale`` later).
    - anything else (palette, CMYK, YCbCr, ...) -> ``convert("RGB")`` uint8.

    Raises:
      ValueError: a mode ``"I"`` image with values outside [0, 65535] (real
        32-bit integer data is not supported: convert it to 8 or 16 bit).
    """
    mode = image.mode
    if mode in ("1", "L", "LA", "RGB", "RGBA"):
        return np.asarray(image)
    if mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16)
    if mode == "I":
        x = np.asarray(image)
        lo, hi = (int(x.min()), int(x.max())) if x.size else (0, 0)
        if lo < 0 or hi > _UINT16_MAX:
            raise ValueError(
                f"32-bit integer image (PIL mode 'I') with values in [{lo}, {hi}]: only "
                "16-bit data [0, 65535] is supported in this mode; convert the image to "
                "8- or 16-bit"
            )
        return x.astype(np.uint16)
    if mode == "F":
        return np.asarray(image, dtype=np.float32)
    return np.asarray(image.convert("RGB"))


def rgb_channels(image: np.ndarray) -> np.ndarray:
    """Channel layout only: ``[H, W]`` / ``[H, W, 1|2|3|4]`` -> ``[H, W, 3]``, same dtype.

    Grayscale is replicated; alpha (the last channel of 2- and 4-channel
    images) is dropped.

    Raises:
      ValueError: unsupported rank / channel count.
    """
    x = np.asarray(image)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(
            f"expected an image [H, W], [H, W, 1|2|3|4] (gray, gray+alpha, RGB, RGBA); "
            f"got shape {x.shape}"
        )
    if x.shape[-1] in (2, 4):
        x = x[..., :-1]  # drop alpha
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return x


def uint16_to_uint8(x: np.ndarray) -> np.ndarray:
    """``round(x / 257)`` as uint8 for 16-bit samples (exact integer rounding)."""
    return ((x.astype(np.uint32) + UINT16_SCALE // 2) // UINT16_SCALE).astype(np.uint8)


def to_rgb(image: ImageLike, float_scale: float = 255.0) -> np.ndarray:
    """Converts one image to ``[H, W, 3]`` RGB (rules in the module docstring).

    Args:
      image: a PIL image (any mode :func:`pil_to_array` reads), or an array
        ``[H, W]``, ``[H, W, 1|2|3|4]`` of dtype uint8, uint16, bool or float.
      float_scale: multiplier applied to float inputs (255 for floats in
        [0, 1]; 1.0 for floats that are already in [0, 255]).

    Returns:
      ``[H, W, 3]`` uint8 (integer, bool or non-float PIL input) or float32 in
      [0, 255] (float input).

    Raises:
      ValueError: unsupported rank/channels, float values outside
        ``[0, 255 / float_scale]``, or a mode ``"I"`` image outside 16 bits.
      TypeError: an integer dtype other than uint8 / uint16.
    """
    if isinstance(image, Image.Image):
        image = pil_to_array(image)
    x = rgb_channels(image)
    if np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32) * np.float32(float_scale)
        lo, hi = float(x.min(initial=0.0)), float(x.max(initial=0.0))
        if lo < -1e-3 or hi > 255.0 + 1e-3:
            raise ValueError(
                f"float image values scaled by {float_scale} span [{lo:.4g}, {hi:.4g}], "
                "outside [0, 255]; floats are expected in [0, 1] (pass float_scale=1.0 for "
                "[0, 255] floats)"
            )
        return np.clip(x, 0.0, 255.0)
    if x.dtype == np.bool_:
        return x.astype(np.uint8) * np.uint8(255)
    if x.dtype == np.uint16:
        return uint16_to_uint8(x)
    if x.dtype != np.uint8:
        raise TypeError(f"integer images must be uint8 or uint16, got {x.dtype}")
    return x


def image_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """`(height, width)` of an image size given as one side (square) or as `(H, W)`."""
    if isinstance(size, int | np.integer):
        return int(size), int(size)
    hw = tuple(int(v) for v in size)
    if len(hw) != 2:
        raise ValueError(f"image size must be one int or (height, width), got {size!r}")
    return hw


RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
"""Resize filters of :func:`resize_rgb` (module docstring)."""


def _check_resample(resample: str) -> None:
    if resample not in RESAMPLE:
        raise ValueError(
            f"resample must be one of {sorted(RESAMPLE)} (bilinear: CNN backbones, "
            f"bicubic: CLIP / WinCLIP), got {resample!r}."
        )


def resize_float(
    x: np.ndarray, size: int | tuple[int, int], resample: str = "bilinear"
) -> np.ndarray:
    """Per-channel resize of ``[H, W, C]`` in PIL's 32-bit float mode; float32, unclipped."""
    _check_resample(resample)
    x = np.asarray(x, np.float32)
    h, w = image_hw(size)
    channels = [
        np.asarray(Image.fromarray(x[..., c]).resize((w, h), RESAMPLE[resample]))
        for c in range(x.shape[-1])
    ]
    return np.stack(channels, axis=-1).astype(np.float32)


def resize_rgb(
    image: ImageLike,
    size: int | tuple[int, int] = 256,
    float_scale: float = 255.0,
    resample: str = "bilinear",
) -> np.ndarray:
    """:func:`to_rgb`, then PIL resize to ``size x size`` (or ``(H, W)``); keeps the dtype.

    Args:
      image: see :func:`to_rgb`.
      size: output side in pixels, or ``(height, width)`` for a non-square output.
      float_scale: see :func:`to_rgb`.
      resample: ``"bilinear"`` (default, the CNN backbones) or ``"bicubic"``
        (antialiased, CLIP / WinCLIP as anomalib; module docstring).

    Returns:
      ``[H, W, 3]``: uint8 for integer / bool / non-float PIL input,
      float32 in [0, 255] for float input.

    Raises:
      ValueError: unknown ``resample`` (names the choices).
    """
    _check_resample(resample)
    x = to_rgb(image, float_scale)
    h, w = image_hw(size)
    if x.shape[:2] == (h, w):
        return x
    if x.dtype == np.uint8 and resample == "bilinear":
        return np.asarray(Image.fromarray(x).resize((w, h), Image.Resampling.BILINEAR))
    out = np.clip(resize_float(x, size, resample), 0.0, 255.0)
    if x.dtype == np.uint8:
        return np.round(out).astype(np.uint8)
    return out.astype(np.float32)


def resize_image(image: ImageLike, size: int = 256, float_scale: float = 255.0) -> np.ndarray:
    """Converts to RGB and bilinearly resizes to ``size x size`` (no crop, aspect not kept).

    Args:
      image: see :func:`to_rgb`.
      size: output side in pixels.
      float_scale: see :func:`to_rgb`.

    Returns:
      ``[size, size, 3]`` float32 pixels in [0, 255] (:func:`resize_rgb` as float32).
    """
    return resize_rgb(image, size, float_scale).astype(np.float32)


def preprocess_batch(
    images: Sequence[ImageLike], size: int = 256, float_scale: float = 255.0
) -> np.ndarray:
    """Resizes a list of images (any sizes / channel layouts) into one batch.

    Args:
      images: images accepted by :func:`to_rgb`.
      size: output side in pixels.
      float_scale: see :func:`to_rgb`.

    Returns:
      ``[B, size, size, 3]`` float32 in [0, 255], ready for ``Extractor.extract``.
    """
    if len(images) == 0:
        raise ValueError("preprocess_batch needs at least one image")
    return np.stack([resize_image(im, size, float_scale) for im in images])
