import jax
import jax.numpy as jnp
import numpy as np
import pytest

from protorefine_jax.clip import windows


def _numpy_windows(h, w, k):
    """Independent window enumeration: top-left corners row-major, cells row-major."""
    out = []
    for i in range(h - k + 1):
        for j in range(w - k + 1):
            out.append([(i + a) * w + (j + b) for a in range(k) for b in range(k)])
    return np.array(out)


@pytest.mark.parametrize("grid,k", [((15, 15), 2), ((15, 15), 3), ((4, 6), 2), ((5, 5), 5)])
def test_window_indices_match_loop(grid, k):
    idx = windows.window_indices(grid, k)
    np.testing.assert_array_equal(idx, _numpy_windows(*grid, k))
    assert windows.window_grid(grid, k) == (grid[0] - k + 1, grid[1] - k + 1)


def test_window_counts_at_240px():
    assert windows.window_indices((15, 15), 2).shape == (196, 4)
    assert windows.window_indices((15, 15), 3).shape == (169, 9)


@pytest.mark.parametrize("grid,k", [((15, 15), 2), ((15, 15), 3), ((7, 4), 3)])
def test_coverage_counts(grid, k):
    h, w = grid
    counts = windows.coverage_counts(grid, k)
    # A patch (i, j) is covered by the windows whose top-left corner lies in
    # [i-k+1, i] x [j-k+1, j], clipped to valid corners.
    expected = np.zeros(grid, int)
    for i in range(h):
        for j in range(w):
            rows = min(i, h - k) - max(0, i - k + 1) + 1
            cols = min(j, w - k) - max(0, j - k + 1) + 1
            expected[i, j] = rows * cols
    np.testing.assert_array_equal(counts, expected)
    assert counts.sum() == (h - k + 1) * (w - k + 1) * k * k


def test_coverage_15x15_values():
    c2 = windows.coverage_counts((15, 15), 2)
    assert c2[0, 0] == 1 and c2[0, 7] == 2 and c2[7, 7] == 4
    c3 = windows.coverage_counts((15, 15), 3)
    assert c3[0, 0] == 1 and c3[1, 1] == 4 and c3[0, 7] == 3 and c3[7, 7] == 9


def _numpy_aggregate(scores, grid, k, how):
    h, w = grid
    idx = _numpy_windows(h, w, k)
    out = np.zeros(h * w)
    for p in range(h * w):
        covering = [scores[r] for r in range(len(idx)) if p in idx[r]]
        covering = np.array(covering, np.float64)
        out[p] = len(covering) / np.sum(1.0 / covering) if how == "harmonic" else covering.mean()
    return out.reshape(grid)


@pytest.mark.parametrize("how", ["harmonic", "mean"])
@pytest.mark.parametrize("grid,k", [((15, 15), 2), ((15, 15), 3), ((5, 7), 2)])
def test_aggregation_matches_numpy_loop(rng, how, grid, k):
    n = windows.window_indices(grid, k).shape[0]
    scores = rng.uniform(0.01, 1.0, n).astype(np.float32)
    got = windows.aggregate_windows(jnp.asarray(scores), grid, k, how)
    np.testing.assert_allclose(got, _numpy_aggregate(scores, grid, k, how), rtol=1e-5, atol=1e-7)


def test_harmonic_with_zero_score_gives_zero_not_nan():
    scores = jnp.ones((16,)).at[0].set(0.0)  # 5x5 grid, 2x2 windows
    got = np.asarray(windows.aggregate_windows(scores, (5, 5), 2))
    assert np.all(np.isfinite(got))
    assert got[0, 0] == 0 and got[1, 1] == 0 and got[4, 4] == 1


def test_aggregation_is_jittable_and_vmappable(rng):
    scores = jnp.asarray(rng.uniform(0.1, 1, (3, 16)), jnp.float32)
    f = jax.jit(jax.vmap(lambda s: windows.aggregate_windows(s, (5, 5), 2)))
    got = f(scores)
    for b in range(3):
        np.testing.assert_allclose(
            got[b], _numpy_aggregate(np.asarray(scores[b]), (5, 5), 2, "harmonic"), rtol=1e-5
        )


def test_errors():
    with pytest.raises(ValueError, match="does not fit"):
        windows.window_indices((4, 4), 5)
    with pytest.raises(ValueError, match="expected 9 window scores"):
        windows.aggregate_windows(jnp.ones(10), (4, 4), 2)
    with pytest.raises(ValueError, match="aggregation must be"):
        windows.aggregate_windows(jnp.ones(9), (4, 4), 2, "max")
