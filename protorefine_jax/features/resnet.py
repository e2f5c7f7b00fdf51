"""Wide-ResNet-50-2 (torchvision layout) in Flax linen, up to ``layer3``.

The network is torchvision's ``wide_resnet50_2`` (Zagoruyko & Komodakis 2016;
He et al. 2016 bottlenecks with the 3x3 width doubled): stem 7x7/2 conv, BN,
ReLU, 3x3/2 max-pool, then bottleneck stages of 3, 4, 6 (and 3) blocks. Only
the stages PatchCore reads are built: ``layer2`` (stride 8, 512 channels) and
``layer3`` (stride 16, 1024 channels). Padding is PyTorch's symmetric explicit
padding and BN uses ``eps = 1e-5``; inputs are ImageNet-normalised RGB.

Built like flax ``examples/imagenet``: one generic ``ResNet`` plus ``partial``
for the depth and width of each variant.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from protorefine_jax.features import checkpoints

BN_EPS = 1e-5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_Conv = functools.partial(nn.Conv, use_bias=False)
_BatchNorm = functools.partial(nn.BatchNorm, use_running_average=True, epsilon=BN_EPS)


def _pad(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    return ((k // 2, k // 2), (k // 2, k // 2))


class Bottleneck(nn.Module):
    """torchvision ``Bottleneck``: 1x1 -> 3x3 (stride) -> 1x1 (x4), projection shortcut.

    Attributes:
      planes: the block's base width; the output has ``4 * planes`` channels.
      width: channels of the inner 1x1/3x3 convs (``planes * width_multiplier``).
      stride: spatial stride, carried by the 3x3 conv as in torchvision (ResNet v1.5).
      downsample: whether the shortcut is a 1x1 conv + BN projection.
    """

    planes: int
    width: int
    stride: int = 1
    downsample: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block. ``x``: ``[B, H, W, C]`` -> ``[B, H/s, W/s, 4*planes]``."""
        y = _Conv(self.width, (1, 1), padding="VALID", name="conv1")(x)
        y = nn.relu(_BatchNorm(name="bn1")(y))
        y = _Conv(self.width, (3, 3), strides=self.stride, padding=_pad(3), name="conv2")(y)
        y = nn.relu(_BatchNorm(name="bn2")(y))
        y = _Conv(4 * self.planes, (1, 1), padding="VALID", name="conv3")(y)
        y = _BatchNorm(name="bn3")(y)
        shortcut = x
        if self.downsample:
            shortcut = _Conv(
                4 * self.planes, (1, 1), strides=self.stride, padding="VALID", name="downsample_0"
            )(x)
            shortcut = _BatchNorm(name="downsample_1")(shortcut)
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """A torchvision bottleneck ResNet truncated after its last listed stage.

    Attributes:
      stage_sizes: blocks per stage, e.g. ``(3, 4, 6)`` for ``layer1..layer3``.
      width_multiplier: inner width / planes (2 for the wide variants).
      return_stages: 1-based stages whose outputs are returned.
    """

    stage_sizes: Sequence[int]
    width_multiplier: int = 1
    return_stages: Sequence[int] = (2, 3)

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        """Runs the stem and the stages on ImageNet-normalised images.

        Args:
          x: ``[B, H, W, 3]`` float32, normalised with ``IMAGENET_MEAN/STD``.

        Returns:
          one map per entry of ``return_stages``; stage ``s`` has shape
          ``[B, H / 2**(s+1), W / 2**(s+1), 64 * 2**(s+1)]`` (e.g. ``layer2``:
          ``[B, H/8, W/8, 512]``, ``layer3``: ``[B, H/16, W/16, 1024]``).
        """
        x = _Conv(64, (7, 7), strides=2, padding=_pad(7), name="conv1")(x)
        x = nn.relu(_BatchNorm(name="bn1")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(3))
        outputs = []
        for s, n_blocks in enumerate(self.stage_sizes):
            planes = 64 * 2**s
            for b in range(n_blocks):
                stride = 2 if (s > 0 and b == 0) else 1
                x = Bottleneck(
                    planes,
                    planes * self.width_multiplier,
                    stride,
                    downsample=b == 0,
                    name=f"layer{s + 1}_{b}",
                )(x)
            if s + 1 in self.return_stages:
                outputs.append(x)
        return tuple(outputs)


WideResNet50_2 = functools.partial(ResNet, stage_sizes=(3, 4, 6), width_multiplier=2)


def normalize(images: jax.Array) -> jax.Array:
    """Maps raw RGB pixels in [0, 255] to ImageNet-normalised inputs."""
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32) * 255.0
    std = jnp.asarray(IMAGENET_STD, jnp.float32) * 255.0
    return (images.astype(jnp.float32) - mean) / std


def _module_layout(
    stage_sizes: Sequence[int], width_multiplier: int
) -> dict[str, tuple[str, int, int, int]]:
    """``{torch prefix: (kind, in_ch, out_ch, kernel)}`` in torchvision's order."""
    layout = {"conv1": ("conv", 3, 64, 7), "bn1": ("bn", 0, 64, 0)}
    in_ch = 64
    for s, n_blocks in enumerate(stage_sizes):
        planes = 64 * 2**s
        width = planes * width_multiplier
        for b in range(n_blocks):
            p = f"layer{s + 1}.{b}."
            layout[p + "conv1"] = ("conv", in_ch, width, 1)
            layout[p + "bn1"] = ("bn", 0, width, 0)
            layout[p + "conv2"] = ("conv", width, width, 3)
            layout[p + "bn2"] = ("bn", 0, width, 0)
            layout[p + "conv3"] = ("conv", width, 4 * planes, 1)
            layout[p + "bn3"] = ("bn", 0, 4 * planes, 0)
            if b == 0:
                layout[p + "downsample.0"] = ("conv", in_ch, 4 * planes, 1)
                layout[p + "downsample.1"] = ("bn", 0, 4 * planes, 0)
            in_ch = 4 * planes
    return layout


def expected_shapes(
    stage_sizes: Sequence[int] = (3, 4, 6), width_multiplier: int = 2
) -> dict[str, tuple[int, ...]]:
    """Torchvision state-dict keys (up to the last built stage) and their shapes.

    ``num_batches_tracked``, ``layer4.*`` and ``fc.*`` are not needed and not listed.
    """
    return checkpoints.layout_shapes(_module_layout(stage_sizes, width_multiplier))


def _flax_path(prefix: str) -> tuple[str, ...]:
    """``layer2.0.downsample.1`` -> ``("layer2_0", "downsample_1")``."""
    parts = prefix.split(".")
    if parts[0].startswith("layer"):
        return (f"{parts[0]}_{parts[1]}", "_".join(parts[2:]))
    return (parts[0],)


def params_from_state_dict(
    state: Mapping[str, np.ndarray],
    source: str = "<state dict>",
    stage_sizes: Sequence[int] = (3, 4, 6),
    width_multiplier: int = 2,
) -> dict[str, Any]:
    """Converts a torchvision ResNet state dict into Flax variables for ``ResNet``.

    Keys of stages that are not built (``layer4``) and of ``fc`` are ignored.

    Args:
      state: ``{torch key: array}``, e.g. ``checkpoints.load_state_dict(path)``.
      source: file name quoted in errors.
      stage_sizes: blocks per built stage (WRN-50-2: ``(3, 4, 6)``).
      width_multiplier: 2 for Wide-ResNet.

    Returns:
      ``{"params": ..., "batch_stats": ...}``.

    Raises:
      checkpoints.CheckpointError: naming ``source`` and the first missing or
        mismatched key.
    """
    layout = _module_layout(stage_sizes, width_multiplier)
    return checkpoints.layout_to_flax(state, layout, _flax_path, source)
