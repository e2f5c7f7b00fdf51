import jax.numpy as jnp
import numpy as np
import pytest

from protorefine_jax import coreset as cs


def numpy_greedy(points, n, start):
    """Float64 reference greedy k-center."""
    points = np.asarray(points, np.float64)
    sel = [start]
    mind = ((points - points[start]) ** 2).sum(1)
    for _ in range(1, n):
        nxt = int(np.argmax(mind))
        sel.append(nxt)
        mind = np.minimum(mind, ((points - points[nxt]) ** 2).sum(1))
    return np.array(sel)


@pytest.mark.parametrize("start", [0, 17])
def test_indices_equal_float64_numpy_on_same_projection(rng, start):
    feats = rng.standard_normal((600, 256)).astype(np.float32)
    idx = np.asarray(cs.greedy_coreset(jnp.asarray(feats), 0.1, start_index=start))
    proj = np.asarray(cs.projection_matrix(256, 128, 0), np.float64)
    ref = numpy_greedy(feats.astype(np.float64) @ proj, 60, start)
    np.testing.assert_array_equal(idx, ref)


def test_no_projection_below_projection_dim(rng):
    feats = rng.standard_normal((300, 64)).astype(np.float32)
    idx = np.asarray(cs.greedy_coreset(jnp.asarray(feats), 0.2))
    np.testing.assert_array_equal(idx, numpy_greedy(feats, 60, 0))


def test_indices_are_distinct_and_in_range(rng):
    feats = rng.standard_normal((500, 200)).astype(np.float32)
    idx = np.asarray(cs.greedy_coreset(jnp.asarray(feats), 0.5))
    assert len(set(idx.tolist())) == 250
    assert idx.min() >= 0 and idx.max() < 500


@pytest.mark.parametrize(
    ("num", "alpha", "n"), [(4096, 0.05, 204), (2048, 0.05, 102), (10, 0.01, 1), (7, 1.0, 7)]
)
def test_coreset_size(num, alpha, n):
    assert cs.coreset_size(num, alpha) == n


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5])
def test_alpha_outside_unit_interval_is_rejected(alpha):
    with pytest.raises(ValueError, match=r"alpha must lie in \(0, 1\]"):
        cs.coreset_size(100, alpha)


def test_empty_features_are_rejected():
    with pytest.raises(ValueError, match="empty"):
        cs.coreset_size(0, 0.1)


def test_bad_start_index_is_rejected(rng):
    with pytest.raises(ValueError, match="start_index"):
        cs.greedy_coreset(jnp.asarray(rng.standard_normal((10, 4))), 0.5, start_index=10)


def test_same_shapes_do_not_recompile(rng):
    pts = jnp.asarray(rng.standard_normal((100, 8)), jnp.float32)
    cs.greedy_coreset_indices(pts, 10, 0)
    before = cs.greedy_coreset_indices._cache_size()
    cs.greedy_coreset_indices(pts + 1.0, 10, 3)
    assert cs.greedy_coreset_indices._cache_size() == before
