import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from protorefine_jax.transport import sinkhorn_plan, sinkhorn_t


def numpy_sinkhorn(cost, eps, iters, a, b):
    """Float64 log-domain Sinkhorn, g then f per iteration (as ott).

    Zero-mass prototypes start at potential -inf (they take part in nothing).
    """
    f = np.where(a > 0, 0.0, -np.inf)
    g = np.zeros(len(b))
    with np.errstate(divide="ignore"):  # log(0) = -inf for zero-mass prototypes
        for _ in range(iters):
            g = eps * np.log(b) - eps * logsumexp((f[:, None] - cost) / eps, axis=0)
            f = eps * np.log(a) - eps * logsumexp((g[None, :] - cost) / eps, axis=1)
    return np.exp((f[:, None] + g[None, :] - cost) / eps)


@pytest.mark.parametrize("mode", ["log", "absorbed"])
def test_plan_matches_float64_numpy_sinkhorn(rng, mode):
    n, m = 20, 50
    cost = rng.random((n, m)) * 3.0
    eps = 0.05 * cost.mean()
    a, b = np.full(n, 1 / n), np.full(m, 1 / m)
    ref = numpy_sinkhorn(cost, eps, 30, a, b)
    # Both modes run the same iterations (scalings instead of potentials).
    got = sinkhorn_plan(jnp.asarray(cost, jnp.float32), eps, 30, mode=mode)
    np.testing.assert_allclose(np.asarray(got.plan), ref, rtol=2e-3, atol=1e-7)


@pytest.mark.parametrize("mode", ["log", "absorbed"])
def test_converged_plan_meets_marginals(rng, mode):
    n, m = 30, 80
    cost = jnp.asarray(rng.random((n, m)), jnp.float32)
    out = sinkhorn_plan(cost, 0.05 * float(cost.mean()), 500, mode=mode)
    np.testing.assert_allclose(np.asarray(out.plan.sum(1)), np.full(n, 1 / n), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(out.plan.sum(0)), np.full(m, 1 / m), rtol=1e-4)
    assert float(out.marginal_error) < 1e-4


def test_marginal_error_reports_unconverged_plans(rng):
    cost = jnp.asarray(rng.random((30, 80)) ** 4, jnp.float32)
    short = sinkhorn_plan(cost, 0.01 * float(cost.mean()), 1)
    col = np.asarray(short.plan.sum(0))
    np.testing.assert_allclose(float(short.marginal_error), np.max(np.abs(col * 80 - 1)), rtol=1e-4)
    assert float(short.marginal_error) > 1e-2


def test_warm_start_from_converged_potentials_stays_converged(rng):
    cost = jnp.asarray(rng.random((30, 80)), jnp.float32)
    eps = 0.05 * float(cost.mean())
    full = sinkhorn_plan(cost, eps, 500)
    warm = sinkhorn_plan(cost, eps, 1, init=(full.f, full.g))
    np.testing.assert_allclose(np.asarray(warm.plan), np.asarray(full.plan), rtol=1e-4, atol=1e-8)


def test_no_gradient_flows_through_the_plan(rng):
    cost = jnp.asarray(rng.random((5, 7)), jnp.float32)
    grad = jax.grad(lambda c: jnp.sum(sinkhorn_plan(c, 0.1, 10).plan * 2.0))(cost)
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_absorbed_mode_survives_costs_that_underflow_a_plain_kernel(rng):
    """exp(-C / eps) is 0 in float32 for C / eps > ~104: absorption avoids it."""
    cost = jnp.asarray(rng.random((20, 50)) * 300.0, jnp.float32)
    eps = 0.01 * float(cost.mean())  # C / eps up to ~200
    assert not np.asarray(jnp.exp(-cost / eps) > 0).all()
    log = sinkhorn_plan(cost, eps, 300)
    absorbed = sinkhorn_plan(cost, eps, 300, mode="absorbed")
    assert np.isfinite(np.asarray(absorbed.plan)).all()
    np.testing.assert_allclose(np.asarray(absorbed.plan), np.asarray(log.plan), atol=1e-6)


def test_absorbed_warm_start_continues_the_log_iterations(rng):
    cost = jnp.asarray(rng.random((30, 80)), jnp.float32)
    eps = 0.05 * float(cost.mean())
    first = sinkhorn_plan(cost, eps, 5)
    cont = sinkhorn_plan(cost, eps, 5, init=(first.f, first.g), mode="absorbed")
    ref = sinkhorn_plan(cost, eps, 10)
    np.testing.assert_allclose(np.asarray(cont.plan), np.asarray(ref.plan), rtol=1e-4, atol=1e-8)


def test_unknown_mode_is_rejected(rng):
    with pytest.raises(ValueError, match="unknown Sinkhorn mode"):
        sinkhorn_plan(jnp.ones((3, 4)), 0.1, 5, mode="fast")


def _clustered_cost(rng, n, m):
    centers = rng.normal(size=(4, 8)) * 3
    x = centers[rng.integers(0, 4, n)] + 0.1 * rng.normal(size=(n, 8))
    y = centers[rng.integers(0, 4, m)] + 0.1 * rng.normal(size=(m, 8))
    return ((x[:, None] - y[None]) ** 2).sum(-1)


def _separated_cost(rng, n, m):
    x, y = rng.normal(size=(n, 8)) * 5, rng.normal(size=(m, 8)) * 5
    return ((x[:, None] - y[None]) ** 2).sum(-1)


@pytest.mark.parametrize("kind", ["clustered", "separated"])
@pytest.mark.parametrize("rel_eps", [1e-3, 2e-3, 1e-2])
def test_absorbed_equals_float64_log_reference_at_small_epsilon(rng, kind, rel_eps):
    """Issue 13 item 1: 40 x 100, cold start, 300 iterations, epsilon down to the
    config's minimum (1e-3 x mean cost). Before re-absorption the clustered cost
    at 1e-3 lost 43 columns (plan L1 error 0.41); now both modes agree with the
    float64 log-domain reference to an L1 error of 1e-4 of the unit mass."""
    cost = (_clustered_cost if kind == "clustered" else _separated_cost)(rng, 40, 100)
    eps = rel_eps * cost.mean()
    a, b = np.full(40, 1 / 40), np.full(100, 1 / 100)
    ref = numpy_sinkhorn(cost, eps, 300, a, b)
    plans = {}
    for mode in ("log", "absorbed"):
        got = sinkhorn_plan(jnp.asarray(cost, jnp.float32), eps, 300, mode=mode)
        plan = np.asarray(got.plan, np.float64)
        assert np.isfinite(plan).all()
        assert (plan.sum(0) > 0).all() and (plan.sum(1) > 0).all()
        np.testing.assert_allclose(np.abs(plan - ref).sum(), 0.0, atol=1e-4)
        plans[mode] = plan
    np.testing.assert_allclose(plans["absorbed"], plans["log"], rtol=0, atol=2e-6)


def test_absorbed_mode_gives_zero_mass_rows_no_plan_and_matches_log(rng):
    """Empty ring-buffer slots (a_i = 0, potential -inf) take part in nothing."""
    n, m = 12, 40
    cost = jnp.asarray(rng.random((n, m)), jnp.float32)
    a = np.full(n, 1 / 9, np.float32)
    a[[2, 5, 11]] = 0.0
    a = jnp.asarray(a)
    f0 = jnp.where(a > 0, 0.0, -jnp.inf)
    eps = 0.05 * float(cost.mean())
    init = (f0, jnp.zeros((m,), jnp.float32))
    log = sinkhorn_plan(cost, eps, 40, a=a, init=init, mode="log")
    absorbed = sinkhorn_plan(cost, eps, 40, a=a, init=init, mode="absorbed")
    plan = np.asarray(absorbed.plan)
    assert np.isfinite(plan).all()
    np.testing.assert_array_equal(plan[[2, 5, 11]], 0.0)
    np.testing.assert_allclose(plan, np.asarray(log.plan), rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(np.asarray(absorbed.g), np.asarray(log.g), rtol=1e-4, atol=1e-6)
    assert np.isneginf(np.asarray(absorbed.f)[[2, 5, 11]]).all()


@pytest.mark.parametrize("iters", [1, 11, 25])
def test_transposed_absorbed_mode_is_the_absorbed_plan_transposed(rng, iters):
    """`sinkhorn_t` (the refinement's layout) against `sinkhorn_plan` and float64 numpy."""
    n, m = 12, 40
    cost = rng.random((n, m)) * 2.0
    a = np.full(n, 1 / n)
    a[[3, 7]] = 0.0
    a /= a.sum()
    eps = 0.05 * cost.mean()
    out = sinkhorn_t(jnp.asarray(cost.T, jnp.float32), eps, iters, jnp.asarray(a, jnp.float32))
    ref = sinkhorn_plan(
        jnp.asarray(cost, jnp.float32), eps, iters, a=jnp.asarray(a), mode="absorbed"
    )
    plan_t = np.asarray(out.plan_t)
    np.testing.assert_allclose(plan_t, np.asarray(ref.plan).T, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(
        plan_t.T, numpy_sinkhorn(cost, eps, iters, a, np.full(m, 1 / m)), rtol=2e-3, atol=1e-7
    )
    # The refined-side marginal it reports is the plan's, and the error is the plan's.
    np.testing.assert_allclose(np.asarray(out.col), plan_t.sum(1), rtol=1e-5)
    col_err = np.max(np.abs(plan_t.sum(1) * m - 1))
    row_err = np.max(np.abs(plan_t.sum(0) - a)[a > 0] / a[a > 0])
    np.testing.assert_allclose(
        float(out.marginal_error), max(col_err, row_err), rtol=1e-3, atol=1e-6
    )
    assert np.all(plan_t[:, [3, 7]] == 0) and np.isneginf(np.asarray(out.f)[[3, 7]]).all()
