"""Image preprocessing at the data edge (numpy / PIL, outside jit).

Images are resized to a square without cropping (FastRef Sec. 6.1: 256 x 256)
and brought to 3-channel RGB pixels in [0, 255]. Per-backbone normalisation is
not done here: it happens inside each extractor's jitted ``extract``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

ImageLike = np.ndarray | Image.Image


def to_rgb(image: ImageLike, float_scale: float = 255.0) -> np.ndarray:
    """Converts one image to ``[H, W, 3]`` RGB.

    Grayscale (``[H, W]`` or ``[H, W, 1]``) is repeated to 3 channels; the alpha
    channel of RGBA / LA images is dropped (as ``PIL.Image.convert("RGB")`` does).

    Args:
      image: a PIL image, or an array ``[H, W]``, ``[H, W, 1|2|3|4]``; uint8 in
        [0, 255] or float in [0, 1] (the scikit-image convention).
      float_scale: multiplier applied to float inputs (use 1.0 for floats that
        are already in [0, 255]).

    Returns:
      ``[H, W, 3]`` uint8 (uint8 or PIL input) or float32 in [0, 255] (float input).

    Raises:
      ValueError: unsupported rank/channels, or float values outside
        ``[0, 255 / float_scale]``.
      TypeError: an integer dtype other than uint8.
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
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
        return x.astype(np.uint8) * 255
    if x.dtype != np.uint8:
        raise TypeError(f"integer images must be uint8, got {x.dtype}")
    return x


def resize_image(image: ImageLike, size: int = 256, float_scale: float = 255.0) -> np.ndarray:
    """Converts to RGB and bilinearly resizes to ``size x size`` (no crop, aspect not kept).

    uint8 images go through ``PIL.Image.resize(BILINEAR)`` (the torchvision
    pipeline of PatchCore); float images are resized per channel in PIL's
    32-bit float mode with the same filter, so they are not quantised.

    Args:
      image: see ``to_rgb``.
      size: output side in pixels.
      float_scale: see ``to_rgb``.

    Returns:
      ``[size, size, 3]`` float32 pixels in [0, 255].
    """
    x = to_rgb(image, float_scale)
    if x.shape[:2] == (size, size):
        return x.astype(np.float32)
    if x.dtype == np.uint8:
        return np.asarray(
            Image.fromarray(x, "RGB").resize((size, size), Image.BILINEAR), np.float32
        )
    channels = [
        np.asarray(Image.fromarray(x[..., c], "F").resize((size, size), Image.BILINEAR))
        for c in range(3)
    ]
    return np.clip(np.stack(channels, axis=-1), 0.0, 255.0).astype(np.float32)


def preprocess_batch(
    images: Sequence[ImageLike], size: int = 256, float_scale: float = 255.0
) -> np.ndarray:
    """Resizes a list of images (any sizes / channel layouts) into one batch.

    Args:
      images: images accepted by ``to_rgb``.
      size: output side in pixels.
      float_scale: see ``to_rgb``.

    Returns:
      ``[B, size, size, 3]`` float32 in [0, 255], ready for ``Extractor.extract``.
    """
    if len(images) == 0:
        raise ValueError("preprocess_batch needs at least one image")
    return np.stack([resize_image(im, size, float_scale) for im in images])
