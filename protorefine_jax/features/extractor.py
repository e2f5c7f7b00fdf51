"""Backbone registry: one jitted ``extract(params, images) -> [B, h*w, c]`` per backbone.

Example:
  >>> ext = get_extractor("efficientnet_lite0")
  >>> params = ext.load_params()  # shipped ImageNet weights
  >>> feats = ext.extract(params, images)  # images: [B, 256, 256, 3] RGB in [0, 255]
  >>> feats.shape == (B, ext.grid[0] * ext.grid[1], ext.feature_dim)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from protorefine_jax.features import aggregation as aggregation_lib
from protorefine_jax.features import efficientnet_lite, resnet
from protorefine_jax.features.preprocess import image_hw
from protorefine_jax.io import torch_checkpoint

Variables = Any  # {"params": ..., "batch_stats": ...}

BACKBONES = ("efficientnet_lite0", "efficientnet_lite2", "wide_resnet50_2")
AGGREGATIONS = ("official", "simple")


class BackboneSpec(NamedTuple):
    """What the registry needs to know about one backbone.

    Attributes:
      channels: channels of the stride-8 and stride-16 maps.
      default_dims: ``(pretrain_dim, target_dim)`` of the official aggregation.
    """

    channels: tuple[int, int]
    default_dims: tuple[int, int]


def _lite_spec(name: str) -> BackboneSpec:
    c8, c16 = efficientnet_lite.feature_channels(efficientnet_lite.LITE_CONFIGS[name])
    # Largest pretrain_dim with no repetition (9 * c8), and target = pretrain as the
    # paper's 1024/1024: the stacked [2, P] vector is halved by pairwise means.
    return BackboneSpec((c8, c16), (9 * min(c8, c16), 9 * min(c8, c16)))


SPECS = {
    "efficientnet_lite0": _lite_spec("efficientnet_lite0"),  # (40, 112), (360, 360)
    "efficientnet_lite2": _lite_spec("efficientnet_lite2"),  # (48, 120), (432, 432)
    "wide_resnet50_2": BackboneSpec((512, 1024), (1024, 1024)),  # PatchCore paper
}


class Extractor(NamedTuple):
    """A backbone plus aggregation, ready to compose into a jitted pipeline.

    Attributes:
      name: backbone name (one of ``BACKBONES``).
      aggregation: ``"official"`` or ``"simple"``.
      image_size: input side in pixels (images must be ``[B, S, S, 3]``), or
        ``(H, W)`` for non-square inputs (``[B, H, W, 3]``).
      grid: ``(h, w)`` patch grid (stride 8).
      feature_dim: ``c`` of the output.
      extract: jitted ``(variables, images [B, S, S, 3] uint8/float in [0, 255])
        -> [B, h*w, c]`` float32; normalisation happens inside.
      init_params: ``key -> variables`` with random weights (BN stats 0 / 1).
      load_params: ``path | None -> variables``; ``None`` loads the shipped weights
        (EfficientNet-Lite only).
    """

    name: str
    aggregation: str
    image_size: int | tuple[int, int]
    grid: tuple[int, int]
    feature_dim: int
    extract: Callable[[Variables, jax.Array], jax.Array]
    init_params: Callable[[jax.Array], Variables]
    load_params: Callable[[str | os.PathLike | None], Variables]


def check_images(images: Any, image_size: int | tuple[int, int]) -> None:
    """Raises ``ValueError`` / ``TypeError`` unless ``images`` is ``[B, H, W, 3]`` pixels."""
    shape = tuple(images.shape)
    h, w = image_hw(image_size)
    if len(shape) != 4 or shape[1:] != (h, w, 3):
        raise ValueError(
            f"expected RGB images of shape [B, {h}, {w}, 3] (NHWC, pixels "
            f"in [0, 255]); got shape {shape}. Resize with "
            "protorefine_jax.features.preprocess_batch"
        )
    dtype = np.dtype(images.dtype)
    if dtype != np.uint8 and not np.issubdtype(dtype, np.floating):
        raise TypeError(f"images must be uint8 or float, got {dtype}")


def _backbone(name: str) -> tuple[Any, Callable, Callable]:
    """Returns ``(module, normalize, features_fn)`` with ``features_fn(v, x) -> (f8, f16)``."""
    if name == "wide_resnet50_2":
        model = resnet.WideResNet50_2()
        return model, resnet.normalize, lambda v, x: model.apply(v, x)
    model = efficientnet_lite.EfficientNetLite(efficientnet_lite.LITE_CONFIGS[name])
    return model, efficientnet_lite.normalize, lambda v, x: model.apply(v, x, features_only=True)


def random_variables(model: Any, key: jax.Array) -> Variables:
    """Random variables for ``model``: He-normal kernels, BN identity (scale 1, stats 0 / 1).

    Drawn on the host with numpy from a generator seeded by ``key``'s bits: Flax's
    own initialisers compile one sampler per parameter, which takes tens of
    seconds on CPU for these networks.

    Args:
      model: a Flax module taking ``[B, H, W, 3]`` images.
      key: a JAX PRNG key (typed or raw ``uint32[2]``).

    Returns:
      ``{"params": ..., "batch_stats": ...}`` with the tree ``model.init`` builds.
    """
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    rng = np.random.default_rng(np.asarray(key, np.uint32).ravel().tolist())
    # Parameter shapes do not depend on the spatial size: trace on a small input.
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            gain = 1.0 if len(leaf.shape) == 2 else 2.0  # dense: LeCun; conv: He
            z = rng.standard_normal(leaf.shape, dtype=np.float32)
            return z * np.float32(np.sqrt(gain / fan_in))
        fill = 1.0 if name in ("scale", "var") else 0.0
        return np.full(leaf.shape, fill, np.float32)

    return jax.device_put(jax.tree_util.tree_map_with_path(draw, shapes))


def _load(name: str, path: str | os.PathLike | None) -> Variables:
    if name == "wide_resnet50_2":
        if path is None:
            raise ValueError(
                "wide_resnet50_2 has no shipped weights: pass the path of a local torchvision "
                "checkpoint, e.g. load_params('wide_resnet50_2-95faca4d.pth') "
                "(.pth, .safetensors or .npz state dict)"
            )
        source = os.fspath(path)
        variables = resnet.params_from_state_dict(torch_checkpoint.load_state_dict(source), source)
    else:
        source = torch_checkpoint.shipped_checkpoint(name) if path is None else os.fspath(path)
        config = efficientnet_lite.LITE_CONFIGS[name]
        state = torch_checkpoint.load_state_dict(source)
        variables = efficientnet_lite.params_from_state_dict(state, config, source)
    return jax.device_put(variables)


def get_extractor(
    name: str,
    aggregation: str = "official",
    image_size: int | tuple[int, int] = 256,
    pretrain_dim: int | None = None,
    target_dim: int | None = None,
    allow_repetition: bool = False,
) -> Extractor:
    """Builds the feature extractor of one backbone.

    Args:
      name: ``"efficientnet_lite0"`` (default weights ship with the package),
        ``"efficientnet_lite2"`` or ``"wide_resnet50_2"`` (needs a local checkpoint).
      aggregation: ``"official"`` (PatchCore unfold / pool, ``target_dim`` features)
        or ``"simple"`` (3x3 mean, concatenated: ``c8 + c16`` features).
      image_size: square input side, or ``(height, width)``; multiples of 16 so
        the stride-16 grid is exactly half the stride-8 grid.
      pretrain_dim: per-stage pooled size (official only); default per backbone
        (``SPECS[name].default_dims``).
      target_dim: final size (official only); default per backbone.
      allow_repetition: accept dims for which adaptive pooling repeats values
        (``pretrain_dim > 9 * c`` or ``target_dim > 2 * pretrain_dim``), e.g. to
        reproduce 1024/1024 on EfficientNet-Lite.

    Returns:
      an ``Extractor``.

    Raises:
      ValueError: unknown name or aggregation, bad image size or dims.
    """
    if name not in SPECS:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(BACKBONES)}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")
    h, w = image_hw(image_size)
    if min(h, w) <= 0 or h % 16 or w % 16:
        near = [max(16, round(v / 16) * 16) for v in (h, w)]
        raise ValueError(
            f"image_size must be a positive multiple of 16 (or (height, width) of such), "
            f"got {image_size}; nearest valid: {near[0]}x{near[1]} (height x width)"
        )
    spec = SPECS[name]
    if aggregation == "official":
        pretrain_dim = spec.default_dims[0] if pretrain_dim is None else int(pretrain_dim)
        target_dim = spec.default_dims[1] if target_dim is None else int(target_dim)
        if min(pretrain_dim, target_dim) <= 0:
            raise ValueError(f"dims must be positive, got {pretrain_dim}, {target_dim}")
        max_pretrain = 9 * min(spec.channels)
        if not allow_repetition and (pretrain_dim > max_pretrain or target_dim > 2 * pretrain_dim):
            raise ValueError(
                f"{name}: pretrain_dim {pretrain_dim} / target_dim {target_dim} would repeat "
                f"values in adaptive pooling (need pretrain_dim <= 9 * {min(spec.channels)} = "
                f"{max_pretrain} and target_dim <= 2 * pretrain_dim); pass "
                "allow_repetition=True to accept"
            )
        aggregate = lambda f8, f16: aggregation_lib.official_aggregate(
            f8, f16, pretrain_dim, target_dim
        )
        feature_dim = target_dim
    else:
        if pretrain_dim is not None or target_dim is not None:
            raise ValueError("pretrain_dim / target_dim only apply to aggregation='official'")
        aggregate = aggregation_lib.simple_aggregate
        feature_dim = sum(spec.channels)

    model, normalize, features = _backbone(name)

    def extract(variables: Variables, images: jax.Array) -> jax.Array:
        """``[B, S, S, 3]`` RGB pixels in [0, 255] (uint8 or float) -> ``[B, h*w, c]``."""
        check_images(images, image_size)  # static shapes: raises at trace time
        f8, f16 = features(variables, normalize(images))
        return aggregate(f8, f16)

    init = lambda key: random_variables(model, key)
    grid = (h // 8, w // 8)
    return Extractor(
        name=name,
        aggregation=aggregation,
        image_size=image_size,
        grid=grid,
        feature_dim=feature_dim,
        extract=jax.jit(extract),
        init_params=init,
        load_params=lambda path=None: _load(name, path),
    )
