"""EfficientNet-Lite with the shipped ImageNet weights classifies natural images correctly."""

import jax
import numpy as np
import pytest
import skimage.data

from protorefine_jax.features import efficientnet_lite as el
from protorefine_jax.features import get_extractor, resize_image

CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
CUPS = (967, 968)  # espresso, cup


def _top1(name):
    config = el.LITE_CONFIGS[name]
    variables = get_extractor(name).load_params()  # shipped legacy .pth, read without torch
    size = config.resolution  # native resolution: 224 (Lite0), 260 (Lite2)
    images = np.stack(
        [resize_image(skimage.data.chelsea(), size), resize_image(skimage.data.coffee(), size)]
    )
    model = el.EfficientNetLite(config)
    logits = jax.jit(lambda v, x: model.apply(v, el.normalize(x)))(variables, images)
    probs = np.asarray(jax.nn.softmax(logits))
    return probs.argmax(-1), probs.max(-1)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_imagenet_classification(name):
    top1, conf = _top1(name)
    assert top1[0] in CATS, (top1, conf)
    assert top1[1] in CUPS, (top1, conf)
    assert conf.min() > 0.5, conf


@pytest.mark.parametrize(
    "name,c8,c16,blocks",
    [("efficientnet_lite0", 40, 112, (4, 10)), ("efficientnet_lite2", 48, 120, (6, 14))],
)
def test_architecture_from_checkpoint_layout(name, c8, c16, blocks):
    config = el.LITE_CONFIGS[name]
    assert el.feature_channels(config) == (c8, c16)
    assert el.feature_blocks(config) == blocks
    n_blocks = {"efficientnet_lite0": 16, "efficientnet_lite2": 21}[name]
    assert len(el.block_args(config)) == n_blocks


@pytest.mark.parametrize(
    "size,kernel,stride,pads",
    [(224, 3, 2, (0, 1)), (15, 5, 2, (2, 2)), (16, 5, 1, (2, 2)), (7, 3, 2, (1, 1))],
)
def test_tf_same_padding(size, kernel, stride, pads):
    assert el.tf_same_padding(size, kernel, stride) == pads


def test_depthwise_conv_matches_grouped_conv():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 10, 6)).astype(np.float32)
    for k, s in ((3, 1), (5, 2), (3, 2)):
        dw = el.DepthwiseConv(k, s)
        v = dw.init(jax.random.key(0), x)
        got = dw.apply(v, x)
        want = jax.lax.conv_general_dilated(
            x,
            v["params"]["kernel"],
            (s, s),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=6,
        )
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_converter_names_file_and_first_bad_key():
    from protorefine_jax.features import CheckpointError
    from protorefine_jax.io import torch_checkpoint as checkpoints

    state = checkpoints.load_state_dict(checkpoints.shipped_checkpoint("efficientnet_lite0"))
    del state["_blocks.3._depthwise_conv.weight"]
    with pytest.raises(CheckpointError, match=r"lite0.pth: missing key '_blocks.3._depthwise"):
        el.params_from_state_dict(state, el.LITE_CONFIGS["efficientnet_lite0"], "lite0.pth")
    # Lite0 weights do not fit Lite2: block 3 has a 3x3 depthwise kernel in Lite2, 5x5 in Lite0.
    state = checkpoints.load_state_dict(checkpoints.shipped_checkpoint("efficientnet_lite0"))
    with pytest.raises(CheckpointError, match=r"lite0.pth: key '_blocks.3._depthwise_conv"):
        el.params_from_state_dict(state, el.LITE_CONFIGS["efficientnet_lite2"], "lite0.pth")
