import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from protorefine_jax import MapConfig, RefineConfig, scoring
from protorefine_jax import refine as rf
from protorefine_jax.config import MAP_FIELDS


@pytest.mark.parametrize(("size", "sigma"), [(256, 4.0), (40, 4.0), (50, 1.5), (7, 4.0)])
def test_blur_matrix_matches_scipy_gaussian_filter1d(rng, size, sigma):
    x = rng.standard_normal(size)
    got = scoring.gaussian_blur_matrix(size, sigma) @ x
    ref = ndimage.gaussian_filter1d(x, sigma, mode="reflect", truncate=4.0)
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("grid", "image"), [((32, 32), (256, 256)), ((15, 15), (240, 240)), ((4, 6), (40, 48))]
)
def test_map_is_jax_resize_then_scipy_gaussian_filter(rng, grid, image):
    scores = rng.random(grid[0] * grid[1]).astype(np.float32)
    cfg = RefineConfig(grid_shape=grid, image_size=image)
    got = np.asarray(scoring.anomaly_map(jnp.asarray(scores), cfg))
    up = np.asarray(jax.image.resize(jnp.asarray(scores.reshape(grid)), image, "bilinear"))
    ref = ndimage.gaussian_filter(up.astype(np.float64), 4.0, mode="reflect", truncate=4.0)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)


def test_no_image_size_returns_the_raw_grid(rng):
    scores = rng.random(12).astype(np.float32)
    cfg = RefineConfig(grid_shape=(3, 4), image_size=None)
    out = scoring.anomaly_map(jnp.asarray(scores), cfg)
    np.testing.assert_array_equal(np.asarray(out), scores.reshape(3, 4))


def test_map_config_renders_the_refine_config_map_alone(rng):
    """MapConfig: a RefineConfig's rendering on its own, the same map, one program."""
    cfg = RefineConfig(lam=0.5, grid_shape=[4, 6], image_size=[40, 48], blur_sigma=2.0)
    rendering = cfg.map_config
    assert rendering == MapConfig(grid_shape=(4, 6), image_size=(40, 48), blur_sigma=2.0)
    assert set(MAP_FIELDS) == {f.name for f in dataclasses.fields(MapConfig)}
    scores = jnp.asarray(rng.random(24).astype(np.float32))
    want = np.asarray(scoring.anomaly_map(scores, cfg))
    np.testing.assert_array_equal(np.asarray(scoring.anomaly_map(scores, rendering)), want)
    np.testing.assert_array_equal(np.asarray(jax.jit(scoring.anomaly_map)(scores, rendering)), want)
    other = cfg.with_map(MapConfig(grid_shape=(4, 6), image_size=None))
    assert other.lam == cfg.lam and other.image_size is None and other.blur_sigma == 4.0
    assert RefineConfig().map_config == MapConfig()  # the same defaults
    with pytest.raises(ValueError, match="blur_sigma must be finite and >= 0, got -1.0"):
        MapConfig(blur_sigma=-1.0)


def test_non_square_patch_count_needs_a_grid_shape():
    with pytest.raises(ValueError, match="grid_shape"):
        scoring.anomaly_map(jnp.zeros(12), RefineConfig())
    with pytest.raises(ValueError, match="does not hold"):
        scoring.anomaly_map(jnp.zeros(12), RefineConfig(grid_shape=(3, 5)))


def brute_force(query, protos, distance):
    if distance == "sqeuclidean":
        d = ((query[:, None] - protos[None]) ** 2).sum(-1)
    else:
        qn = query / np.linalg.norm(query, axis=1, keepdims=True)
        pn = protos / np.linalg.norm(protos, axis=1, keepdims=True)
        d = 0.5 * (1 - qn @ pn.T)
    return d.min(1)


@pytest.mark.parametrize("distance", ["sqeuclidean", "cosine"])
@pytest.mark.parametrize("bank_mode", ["refined", "union"])
# m = 16: one block; 256: two of 128; 301: three of 101, the last padded by 2.
@pytest.mark.parametrize("m", [16, 256, 301])
def test_patch_scores_equal_brute_force_nearest_prototype(rng, distance, bank_mode, m):
    assert scoring.SCORE_BLOCK_ROWS == 128  # the block layouts named above
    bank = rng.standard_normal((10, 24))
    query = rng.standard_normal((m, 24))
    w = rng.standard_normal((m, 10)) * 0.4
    cfg = RefineConfig(distance=distance, m_step="optax", bank=bank_mode)
    with jax.enable_x64(True):
        sys = rf.gram_system(
            jnp.asarray(bank), jnp.asarray(query), cfg.replace(precision="float64")
        )
        got = np.asarray(scoring.refined_patch_scores(sys, jnp.asarray(w), cfg))
        base = np.asarray(scoring.base_patch_scores(sys, cfg))
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True) if distance == "cosine" else bank
    protos = w @ b
    if bank_mode == "union":
        protos = np.concatenate([protos, b])
    np.testing.assert_allclose(got, brute_force(query, protos, distance), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(base, brute_force(query, bank, distance), rtol=1e-9, atol=1e-12)


def test_host_maps_of_grids_are_the_compiled_anomaly_maps():
    rng = np.random.default_rng(5)
    cfg = RefineConfig(grid_shape=(4, 6), image_size=(32, 48), blur_sigma=2.0)
    grids = rng.random((3, 24)).astype(np.float32)
    got = scoring.maps_of_grids(grids, cfg.grid_shape, cfg.image_size, cfg.blur_sigma)
    want = np.stack([np.asarray(scoring.anomaly_map(jnp.asarray(g), cfg)) for g in grids])
    assert got.shape == (3, 32, 48) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
