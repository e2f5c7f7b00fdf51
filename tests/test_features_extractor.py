"""The backbone registry: shapes, jit behaviour (no recompiles) and error messages."""

import functools

import jax
import numpy as np
import pytest

from protorefine_jax.features import BACKBONES, SPECS, extractor, get_extractor


@pytest.fixture(scope="module")
def lite0_small():
    # 64 px keeps compilation short; everything but the grid is size-independent.
    ext = get_extractor("efficientnet_lite0", image_size=64)
    return ext, ext.init_params(jax.random.key(0))


def _images(size, batch=2, seed=0, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (batch, size, size, 3)).astype(dtype)


def test_known_backbones_and_default_dims():
    assert BACKBONES == ("efficientnet_lite0", "efficientnet_lite2", "wide_resnet50_2")
    assert SPECS["wide_resnet50_2"].default_dims == (1024, 1024)
    for name in BACKBONES:
        spec = SPECS[name]
        pretrain, target = spec.default_dims
        # No repetition in adaptive pooling: never pool up.
        assert pretrain <= 9 * min(spec.channels) and target <= 2 * pretrain, name


@pytest.mark.parametrize(
    "name,aggregation,dim",
    [
        ("efficientnet_lite0", "official", 360),
        ("efficientnet_lite0", "simple", 152),
        ("efficientnet_lite2", "official", 432),
        ("efficientnet_lite2", "simple", 168),
        ("wide_resnet50_2", "official", 1024),
        ("wide_resnet50_2", "simple", 1536),
    ],
)
def test_feature_dims_and_grid_at_256(name, aggregation, dim):
    ext = get_extractor(name, aggregation)
    assert (ext.grid, ext.feature_dim, ext.image_size) == ((32, 32), dim, 256)
    images = jax.ShapeDtypeStruct((3, 256, 256, 3), np.uint8)
    out = jax.eval_shape(ext.extract, _abstract_params(ext), images)
    assert out.shape == (3, 32 * 32, dim) and out.dtype == np.float32


@functools.cache
def _param_shapes(name):
    params = get_extractor(name).init_params(jax.random.key(0))
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)


def _abstract_params(ext):
    return _param_shapes(ext.name)


def test_extract_runs_and_no_recompile(lite0_small, monkeypatch):
    _, params = lite0_small
    traces = []
    real_check = extractor.check_images
    # check_images runs once per trace of extract: count traces with a side effect.
    monkeypatch.setattr(extractor, "check_images", lambda *a: traces.append(1) or real_check(*a))
    ext = get_extractor("efficientnet_lite0", image_size=64)  # fresh jit cache
    a = ext.extract(params, _images(64, seed=0))
    assert a.shape == (2, 64, 360) and np.isfinite(np.asarray(a)).all()
    b = ext.extract(params, _images(64, seed=1))  # same shapes and dtype, new values
    assert len(traces) == 1
    assert ext.extract._cache_size() == 1
    assert not np.allclose(np.asarray(a), np.asarray(b))


def test_uint8_and_float_inputs_agree(lite0_small):
    ext, params = lite0_small
    x = _images(64)
    np.testing.assert_allclose(
        np.asarray(ext.extract(params, x)),
        np.asarray(ext.extract(params, x.astype(np.float32))),
        rtol=1e-6,
        atol=1e-6,
    )


def test_batch_items_are_independent(lite0_small):
    ext, params = lite0_small
    x = _images(64, batch=2)
    ab = np.asarray(ext.extract(params, x))
    ba = np.asarray(ext.extract(params, x[::-1]))  # same shape: no recompile
    np.testing.assert_allclose(ab, ba[::-1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(ab[0], ab[1])


def test_init_params_deterministic_and_matches_loaded_tree(lite0_small):
    ext, params = lite0_small
    again = ext.init_params(jax.random.key(0))
    other = ext.init_params(jax.random.key(1))
    leaves = jax.tree.leaves(params)
    assert all(np.array_equal(a, b) for a, b in zip(leaves, jax.tree.leaves(again), strict=True))
    assert not all(
        np.array_equal(a, b) for a, b in zip(leaves, jax.tree.leaves(other), strict=True)
    )
    loaded = ext.load_params()
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    shapes_equal = jax.tree.map(lambda a, b: a.shape == b.shape, loaded, params)
    assert all(jax.tree.leaves(shapes_equal))


@pytest.mark.parametrize(
    "shape,match",
    [
        ((2, 64, 64), r"\[B, 64, 64, 3\].*got shape \(2, 64, 64\)"),
        ((2, 64, 64, 1), r"got shape \(2, 64, 64, 1\)"),
        ((2, 64, 64, 4), r"got shape \(2, 64, 64, 4\)"),
        ((2, 3, 64, 64), r"NHWC.*got shape \(2, 3, 64, 64\)"),
        ((2, 128, 128, 3), r"\[B, 64, 64, 3\].*got shape \(2, 128, 128, 3\)"),
    ],
)
def test_wrong_image_shape(lite0_small, shape, match):
    ext, params = lite0_small
    with pytest.raises(ValueError, match=match):
        ext.extract(params, np.zeros(shape, np.uint8))


def test_wrong_image_dtype(lite0_small):
    ext, params = lite0_small
    with pytest.raises(TypeError, match="uint8 or float, got int32"):
        ext.extract(params, np.zeros((1, 64, 64, 3), np.int32))


def test_unknown_backbone_lists_known_ones():
    with pytest.raises(
        ValueError,
        match="unknown backbone 'resnet18'; known backbones: efficientnet_lite0, "
        "efficientnet_lite2, wide_resnet50_2",
    ):
        get_extractor("resnet18")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(aggregation="mean"), "unknown aggregation 'mean'"),
        (dict(image_size=250), r"multiple of 16 \(or \(height, width\) of such\), got 250"),
        (dict(pretrain_dim=1024), r"would repeat values.*9 \* 40 = 360"),
        (dict(target_dim=1000), "would repeat values"),
        (dict(aggregation="simple", target_dim=100), "only apply to aggregation='official'"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_extractor("efficientnet_lite0", **kwargs)


def test_repetition_allowed_on_request():
    ext = get_extractor(
        "efficientnet_lite0", pretrain_dim=1024, target_dim=1024, allow_repetition=True
    )
    assert ext.feature_dim == 1024
