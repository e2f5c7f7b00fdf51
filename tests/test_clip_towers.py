import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TraceCounter
from transformers import FlaxCLIPModel

from protorefine_jax.clip import towers
from protorefine_jax.clip.spec import (
    PRESETS,
    VIT_B_16,
    VIT_B_16_PLUS_240,
    ClipSpec,
    clip_module,
    random_params,
)

SPEC = ClipSpec(
    image_size=64,
    patch_size=16,
    vision_width=32,
    vision_layers=2,
    vision_heads=4,
    vision_mlp=64,
    text_width=32,
    text_layers=1,
    text_heads=4,
    text_mlp=64,
    context_length=8,
    vocab_size=30,
    embed_dim=16,
)


def init_params(spec, seed=0):
    """Random params in the HF Flax CLIP tree; std 0.2 so that tokens differ visibly."""
    return random_params(spec, seed, std=0.2)


@pytest.fixture(scope="module")
def params():
    return init_params(SPEC)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)


def test_presets():
    assert VIT_B_16_PLUS_240.grid_size == (15, 15)
    cfg = VIT_B_16_PLUS_240.to_hf_config()
    assert cfg.vision_config.hidden_size == 896 and cfg.vision_config.num_attention_heads == 14
    assert cfg.text_config.hidden_size == 640 and cfg.text_config.num_attention_heads == 10
    assert cfg.projection_dim == 640 and cfg.vision_config.hidden_act == "gelu"
    assert VIT_B_16.grid_size == (14, 14) and VIT_B_16.hidden_act == "quick_gelu"
    for spec in PRESETS.values():
        assert ClipSpec.from_hf_config(spec.to_hf_config()) == spec
        assert ClipSpec.from_hf_config(spec.to_hf_config().to_dict()) == spec


def test_spec_validation():
    with pytest.raises(ValueError, match="hidden_act"):
        ClipSpec(hidden_act="relu")
    with pytest.raises(ValueError, match="not divisible"):
        ClipSpec(vision_heads=5)


def test_preprocess_matches_clip_normalisation(images):
    got = towers.preprocess(jnp.asarray(images))
    want = (images / 255.0 - np.array(towers.CLIP_MEAN)) / np.array(towers.CLIP_STD)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_spec_normalisation_fields(images):
    spec = ClipSpec(image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.5, 1.0])
    assert spec.image_mean == (0.5, 0.5, 0.5) and hash(spec)  # lists become tuples
    assert ClipSpec.from_hf_config(spec.to_hf_config()) == ClipSpec()  # shapes only
    got = towers.preprocess(jnp.asarray(images), spec.image_mean, spec.image_std)
    want = (images / 255.0 - 0.5) / np.array([0.25, 0.5, 1.0])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="image_std must be positive"):
        ClipSpec(image_std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="3 \\(RGB\\) values"):
        ClipSpec(image_mean=(0.5, 0.5))


def test_full_grid_window_equals_image_features(params, images):
    """A window covering the whole grid is the model's own image embedding."""
    pixels = towers.preprocess(jnp.asarray(images))
    model = FlaxCLIPModel(SPEC.to_hf_config(), _do_init=False)
    hf_features = jax.jit(lambda px, p: model.get_image_features(px, params=p))
    want = np.asarray(hf_features(jnp.transpose(pixels, (0, 3, 1, 2)), params))
    window = jax.jit(towers.encode_windows, static_argnums=(0, 3))(SPEC, params, pixels, 4)
    assert window.shape == (2, 1, SPEC.embed_dim)
    # Same ops in the same order: equal up to float32 reassociation (1e-5 of the scale).
    scale = np.abs(want).max()
    np.testing.assert_allclose(window[:, 0], want, atol=1e-5 * scale, rtol=0)
    image = jax.jit(towers.encode_image, static_argnums=0)(SPEC, params, pixels)
    np.testing.assert_allclose(image, want, atol=1e-5 * scale, rtol=0)


def _np_layer_norm(x, scale, bias, eps=1e-5):
    x = np.asarray(x, np.float64)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * np.asarray(scale, np.float64) + np.asarray(bias)


def test_multiscale_shapes_and_patch_tokens(params, images):
    """Patch tokens = HF's last hidden state -> post-LN (float64 numpy), unprojected by default.

    anomalib's WinCLIP scores the full-image scale with OpenCLIP's `output_tokens`:
    the last layer's tokens after `ln_post`, NOT projected (`D` wide).
    """
    encode = jax.jit(towers.encode_multiscale, static_argnums=(0, 3, 4))
    pixels = towers.preprocess(jnp.asarray(images))
    vision = jax.jit(
        lambda p, px: clip_module(SPEC).apply(
            {"params": p}, px, method=lambda m, x: m.vision_model(x)
        )
    )
    hidden = np.asarray(vision(params, pixels).last_hidden_state, np.float64)
    vp = params["vision_model"]["post_layernorm"]
    normed = _np_layer_norm(hidden, vp["scale"], vp["bias"])[:, 1:]  # [B, 16, D]
    # Default: unprojected, D = vision_width (32) wide, not E (16).
    raw = towers.encode_multiscale(SPEC, params, jnp.asarray(images))
    assert raw.image.shape == (2, 16)
    assert raw.patches.shape == (2, 16, SPEC.vision_width)
    assert [w.shape for w in raw.windows] == [(2, 9, 16), (2, 4, 16)]
    np.testing.assert_allclose(raw.patches, normed, atol=1e-5 * np.abs(normed).max(), rtol=0)
    # project_patches=True: the same tokens through the visual projection (E wide).
    feats = encode(SPEC, params, jnp.asarray(images), (2, 3), True)
    assert feats.patches.shape == (2, 16, 16)
    want = normed @ np.asarray(params["visual_projection"]["kernel"], np.float64)
    np.testing.assert_allclose(feats.patches, want, atol=1e-5 * np.abs(want).max(), rtol=0)
    np.testing.assert_allclose(raw.windows[0], feats.windows[0], atol=1e-6)
    np.testing.assert_allclose(raw.image, feats.image, atol=1e-6)


def test_window_encoding_does_not_recompile(params, images):
    counter = TraceCounter(towers.encode_multiscale)
    encode = jax.jit(counter, static_argnums=(0, 3, 4))
    first = encode(SPEC, params, jnp.asarray(images), (2, 3), True)
    second = encode(SPEC, params, jnp.asarray(images[::-1] * 0.5), (2, 3), True)
    jax.block_until_ready((first, second))
    assert counter.count == 1
    encode(SPEC, params, jnp.asarray(images[:1]), (2, 3), True)  # new batch size
    assert counter.count == 2


def test_bad_image_shape_raises(params):
    with pytest.raises(ValueError, match=r"expected images \[B, 64, 64, 3\]"):
        towers.encode_multiscale(SPEC, params, jnp.zeros((1, 32, 32, 3)))
