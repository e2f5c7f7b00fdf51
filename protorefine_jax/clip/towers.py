"""CLIP towers on the Hugging Face Flax CLIP module: image, windows, patches, text.

Everything calls the HF `FlaxCLIPModule` through `module.apply` with the HF
param tree and a `method` that uses the module's own submodules
(`vision_model.embeddings`, `pre_layrnorm`, `encoder`, `post_layernorm`,
`visual_projection`, `text_model`, `text_projection`): one set of weights, no
copy into a second tree.

Window embeddings (WinCLIP, Jeong et al. 2023, Sec. 4.2): the tokens of the
patches inside a window (patch + position embeddings, as produced by the
embedding layer) plus the CLS token (class + position embedding) run through
pre-LN, the full encoder and post-LN; the CLS output is projected. All windows
of all images of a batch go through the encoder as ONE batch of short
sequences (`[B * n_windows, 1 + k*k, D]`).

Functions take batches (the HF modules are batched); they are pure and jittable
with `spec` and window sizes static.

Input images: raw RGB in [0, 255] that arrive already at `spec.image_size`,
resized at the data edge straight to the square without crop, with
antialiased BICUBIC (`features.preprocess.resize_rgb(..., resample="bicubic")`,
chosen by the WinCLIP host): what anomalib's WinCLIP does
(`Resize((240, 240), bicubic, antialias=True)` on the decoded image, then
CLIP's Normalize). The data edge stores uint8, so pixels are anomalib's float
values clipped to [0, 255] and rounded (at most 0.5 grey level apart, plus
the bicubic overshoot at sharp edges). CLIP's own inference preprocessing
(short side to `S`, then center crop) is NOT used, as in anomalib: a crop
would cut defects at the image border out of the anomaly map. The
normalisation is CLIP's: the mean/std of `spec.image_mean` / `spec.image_std`
(the CLIP folder's `preprocessor_config.json`, OpenAI's values by default,
which are anomalib's), applied inside jit.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import Array

from protorefine_jax.clip.spec import CLIP_MEAN, CLIP_STD, ClipSpec, clip_module
from protorefine_jax.clip.windows import window_indices

Params = dict[str, Any]


class MultiscaleFeatures(NamedTuple):
    """WinCLIP features of a batch of images.

    Attributes:
      image: `[B, E]` projected CLS embedding of the full image.
      patches: `[B, h*w, C]` full-image patch tokens after post-LN, projected
        (`C = E`) or not (`C = D`, vision width).
      windows: one `[B, n_windows_k, E]` per window size `k`, windows in
        `windows.window_indices` order.
    """

    image: Array
    patches: Array
    windows: tuple[Array, ...]


def preprocess(
    images: Array,
    mean: tuple[float, ...] = CLIP_MEAN,
    std: tuple[float, ...] = CLIP_STD,
) -> Array:
    """CLIP normalisation of raw RGB.

    Args:
      images: `[B, H, W, 3]` RGB in [0, 255] (any real dtype).
      mean: per-channel mean on the [0, 1] scale (`spec.image_mean`; default
        OpenAI CLIP's).
      std: per-channel std on the [0, 1] scale (`spec.image_std`).

    Returns:
      `[B, H, W, 3]` float32, `(x / 255 - mean) / std`.
    """
    mean = jnp.asarray(mean, jnp.float32) * 255.0
    std = jnp.asarray(std, jnp.float32) * 255.0
    return (images.astype(jnp.float32) - mean) / std


def _check_pixels(spec: ClipSpec, pixels: Array) -> None:
    expected = (spec.image_size, spec.image_size, 3)
    if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
        raise ValueError(
            f"expected images [B, {expected[0]}, {expected[1]}, 3], got {pixels.shape}."
        )


def _cls_head(module: Any, tokens: Array) -> Array:
    """Pre-LN, encoder, post-LN on CLS, projection: `[S, T, D] -> [S, E]`."""
    vision = module.vision_model
    hidden = vision.encoder(vision.pre_layrnorm(tokens), deterministic=True)[0]
    return module.visual_projection(vision.post_layernorm(hidden[:, 0]))


def _windows_method(module: Any, pixels: Array, grid: tuple[int, int], sizes: tuple[int, ...]):
    tokens = module.vision_model.embeddings(pixels)  # [B, 1 + h*w, D]
    batch, _, width = tokens.shape
    out = []
    for size in sizes:
        idx = window_indices(grid, size)  # [n_windows, k*k]
        n_windows = idx.shape[0]
        inner = tokens[:, 1 + idx]  # [B, n_windows, k*k, D]
        cls = jnp.broadcast_to(tokens[:, None, :1], (batch, n_windows, 1, width))
        seqs = jnp.concatenate([cls, inner], axis=2).reshape(
            batch * n_windows, 1 + size * size, width
        )
        out.append(_cls_head(module, seqs).reshape(batch, n_windows, -1))
    return tokens, tuple(out)


def encode_windows(spec: ClipSpec, params: Params, pixels: Array, size: int) -> Array:
    """Window embeddings of one window size.

    Args:
      spec: CLIP architecture (static).
      params: HF Flax CLIP params.
      pixels: `[B, S, S, 3]` normalised images (`preprocess` with
        `spec.image_mean/std`), `S = spec.image_size`.
      size: window side `k` in patches; `k` equal to the grid side gives one
        window = the full image (equals `encode_image`).

    Returns:
      `[B, n_windows, E]` projected window embeddings.
    """
    _check_pixels(spec, pixels)
    _, windows = clip_module(spec).apply(
        {"params": params}, pixels, spec.grid_size, (size,), method=_windows_method
    )
    return windows[0]


def _image_method(module: Any, pixels: Array) -> Array:
    return _cls_head(module, module.vision_model.embeddings(pixels))


def encode_image(spec: ClipSpec, params: Params, pixels: Array) -> Array:
    """Projected CLS embeddings `[B, E]` of normalised images `[B, S, S, 3]`."""
    _check_pixels(spec, pixels)
    return clip_module(spec).apply({"params": params}, pixels, method=_image_method)


def _multiscale_method(
    module: Any, pixels: Array, grid: tuple[int, int], sizes: tuple[int, ...], project: bool
):
    tokens, windows = _windows_method(module, pixels, grid, sizes)
    vision = module.vision_model
    hidden = vision.encoder(vision.pre_layrnorm(tokens), deterministic=True)[0]
    normed = vision.post_layernorm(hidden)  # [B, 1 + h*w, D]
    projected = module.visual_projection(normed[:, 0] if not project else normed)
    if project:
        return projected[:, 0], projected[:, 1:], windows
    return projected, normed[:, 1:], windows


def encode_multiscale(
    spec: ClipSpec,
    params: Params,
    images: Array,
    window_sizes: tuple[int, ...] = (2, 3),
    project_patches: bool = False,
) -> MultiscaleFeatures:
    """WinCLIP's multi-scale features of raw images, in one pass of the embedding layer.

    Args:
      spec: CLIP architecture (static).
      params: HF Flax CLIP params.
      images: `[B, S, S, 3]` raw RGB in [0, 255], resized at the data edge
        (module docstring); normalised here with `spec.image_mean/std`.
      window_sizes: window sides in patches (WinCLIP: 2 and 3).
      project_patches: send full-image patch tokens through the visual
        projection after post-LN (`C = E`); False (default) keeps them
        `D`-wide, what OpenCLIP's `output_tokens` returns and anomalib's
        WinCLIP scores with.

    Returns:
      `MultiscaleFeatures(image [B, E], patches [B, h*w, C], windows)`.
    """
    pixels = preprocess(images, spec.image_mean, spec.image_std)
    _check_pixels(spec, pixels)
    image, patches, windows = clip_module(spec).apply(
        {"params": params},
        pixels,
        spec.grid_size,
        tuple(window_sizes),
        project_patches,
        method=_multiscale_method,
    )
    return MultiscaleFeatures(image, patches, windows)


def _text_method(module: Any, input_ids: Array) -> Array:
    positions = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
    outputs = module.text_model(
        input_ids=input_ids,
        attention_mask=jnp.ones_like(input_ids),
        position_ids=positions,
        deterministic=True,
    )
    return module.text_projection(outputs[1])


def encode_text(spec: ClipSpec, params: Params, input_ids: Array) -> Array:
    """Projected text embeddings `[P, E]` of token ids `[P, L]`.

    The HF text tower pools at the first `<|endoftext|>` (`spec.eos_token_id`,
    the largest id, so the same position as OpenCLIP's `argmax`); padding
    after it cannot leak in through the causal mask.
    """
    return clip_module(spec).apply(
        {"params": params}, jnp.asarray(input_ids, jnp.int32), method=_text_method
    )
