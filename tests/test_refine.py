import jax
import jax.numpy as jnp
import numpy as np
import pytest

from protorefine_jax import RefineConfig
from protorefine_jax import refine as rf


def dist(x, y, distance):
    """Float64 pairwise distance [len(x), len(y)] in feature space."""
    if distance == "sqeuclidean":
        return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    yn = y / np.linalg.norm(y, axis=1, keepdims=True)
    return 0.5 * (1.0 - xn @ yn.T)


def numpy_loss(w, plan, bank, query, distance, lam, delta=0.0):
    """The M-step loss in the ridge-augmented feature space, float64.

    Prototypes `[M_i, sqrt(delta) e_i]`, patches `[F_j, 0]` (refine.py).
    """
    if distance == "cosine":
        bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
        query = query / np.linalg.norm(query, axis=1, keepdims=True)
    n = bank.shape[0]
    bank = np.concatenate([bank, np.sqrt(delta) * np.eye(n)], axis=1)
    query = np.concatenate([query, np.zeros((query.shape[0], n))], axis=1)
    refined = w @ bank
    recon = np.mean(np.diag(dist(query, refined, distance)))
    return recon + lam * np.sum(plan * dist(bank, refined, distance))


def problem(rng, n=12, m=20, c=40):
    bank = rng.standard_normal((n, c))
    query = rng.standard_normal((m, c))
    w = rng.standard_normal((m, n)) * 0.3
    plan = rng.random((n, m))
    return bank, query, w, plan / plan.sum()


@pytest.mark.parametrize("distance", ["sqeuclidean", "cosine"])
def test_gram_space_cost_equals_feature_space_cost(rng, distance):
    bank, query, w, _ = problem(rng)
    cfg = RefineConfig(distance=distance, m_step="optax")
    with jax.enable_x64(True):
        sys = rf.gram_system(
            jnp.asarray(bank), jnp.asarray(query), cfg.replace(precision="float64")
        )
        # In the system's units; `scale_sq` (power of two) returns to the caller's.
        got = np.asarray(rf.proto_to_refined(sys, jnp.asarray(w), cfg)) * float(sys.scale_sq)
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True) if distance == "cosine" else bank
    np.testing.assert_allclose(got, dist(b, w @ b, distance), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("distance", ["sqeuclidean", "cosine"])
def test_loss_and_gradient_match_feature_space_finite_differences(rng, distance):
    bank, query, w, plan = problem(rng)
    lam = 0.3
    cfg = RefineConfig(distance=distance, m_step="optax", lam=lam)
    with jax.enable_x64(True):
        sys = rf.gram_system(
            jnp.asarray(bank), jnp.asarray(query), cfg.replace(precision="float64")
        )
        unit = float(sys.scale_sq)  # the system's units -> the features' units
        loss = float(rf.m_step_loss(jnp.asarray(w), jnp.asarray(plan), sys, cfg)) * unit
        grad = unit * np.asarray(
            jax.grad(rf.m_step_loss)(jnp.asarray(w), jnp.asarray(plan), sys, cfg)
        )
        delta = float(sys.delta) * unit
    args = (plan, bank, query, distance, lam, delta)
    np.testing.assert_allclose(loss, numpy_loss(w, *args), rtol=1e-10)
    h = 1e-6
    for j, i in [(0, 0), (3, 7), (19, 11), (10, 5)]:
        wp, wm = w.copy(), w.copy()
        wp[j, i] += h
        wm[j, i] -= h
        fd = (numpy_loss(wp, *args) - numpy_loss(wm, *args)) / (2 * h)
        np.testing.assert_allclose(grad[j, i], fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("distance", ["sqeuclidean", "cosine"])
def test_preconditioned_gradient_is_autodiff_gradient_times_inverse(rng, distance):
    """The closed-form Newton direction of the optax M-step (float64 reference)."""
    bank, query, w, plan = problem(rng)
    cfg = RefineConfig(distance=distance, m_step="optax", lam=0.3, ridge=1e-2)
    with jax.enable_x64(True):
        sys = rf.gram_system(
            jnp.asarray(bank), jnp.asarray(query), cfg.replace(precision="float64")
        )
        grad = np.asarray(jax.grad(rf.m_step_loss)(jnp.asarray(w), jnp.asarray(plan), sys, cfg))
        w0 = rf.least_squares_init(sys)
        got = rf.preconditioned_gradient(jnp.asarray(w), w0, jnp.asarray(plan), sys, cfg)
        gram = np.asarray(sys.gram) + float(sys.delta) * np.eye(len(bank))
    ref = np.linalg.solve(gram, grad.T).T  # grad (G + delta I)^-1 (symmetric)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("n, c, in_force", [(30, 20, 0.2), (20, 20, 0.2), (19, 20, 1e-3)])
def test_least_squares_init_is_the_ridge_solution(rng, n, c, in_force):
    """`ridge_wide` is in force iff n >= c (there the Gram matrix is singular)."""
    bank, query, _, _ = problem(rng, n=n, c=c)
    cfg = RefineConfig(ridge=1e-3, ridge_wide=0.2)
    with jax.enable_x64(True):
        sys = rf.gram_system(
            jnp.asarray(bank), jnp.asarray(query), cfg.replace(precision="float64")
        )
        w0 = np.asarray(rf.least_squares_init(sys))
    gram = bank @ bank.T
    delta = in_force * np.trace(gram) / n
    ref = np.linalg.solve(gram + delta * np.eye(n), bank @ query.T).T
    np.testing.assert_allclose(w0, ref, rtol=1e-8, atol=1e-10)


def test_ridge_regime_is_fixed_by_the_bank_rows_including_empty_slots(rng):
    """Issue 13 item 3: an online bank of 30 rows (12 filled) on 20-d features
    takes `ridge_wide` from its first query, so one stream is scored under one
    ridge; delta is still relative to the mean eigenvalue over the filled rows."""
    bank, query, _, _ = problem(rng, n=30, c=20)
    bank[12:] = 0.0
    weights = np.where(np.arange(30) < 12, 1.0 / 12, 0.0)
    cfg = RefineConfig(ridge=1e-3, ridge_wide=0.2)
    with jax.enable_x64(True):
        sys = rf.gram_system(
            jnp.asarray(bank),
            jnp.asarray(query),
            cfg.replace(precision="float64"),
            jnp.asarray(weights),
        )
    np.testing.assert_allclose(float(sys.delta * sys.scale_sq), 0.2 * np.trace(bank @ bank.T) / 12)
    with jax.enable_x64(True):
        small = rf.gram_system(
            jnp.asarray(bank[:19]),
            jnp.asarray(query),
            cfg.replace(precision="float64"),
            jnp.asarray(weights[:19] * 12 / 12),
        )
    np.testing.assert_allclose(
        float(small.delta * small.scale_sq), 1e-3 * np.trace(bank @ bank.T) / 12
    )


def test_lsq_residual_is_relative_reconstruction_error(rng):
    bank, query, _, _ = problem(rng)
    cfg = RefineConfig()
    with jax.enable_x64(True):
        sys = rf.gram_system(
            jnp.asarray(bank), jnp.asarray(query), cfg.replace(precision="float64")
        )
        w0 = rf.least_squares_init(sys)
        got = float(rf.lsq_residual(sys, w0))
    ref = np.linalg.norm(query - np.asarray(w0) @ bank) / np.linalg.norm(query)
    np.testing.assert_allclose(got, ref, rtol=1e-8)


def _refine(bank, query, **kw):
    cfg = RefineConfig(**kw)
    sys = rf.gram_system(jnp.asarray(bank, jnp.float32), jnp.asarray(query, jnp.float32), cfg)
    return rf.refine(sys, cfg)


@pytest.mark.parametrize("ridge", [1e-4, 1e-2, 1e-1])
def test_closed_form_is_the_fixed_point_of_many_sgd_steps(rng, ridge):
    bank, query, _, _ = problem(rng, n=16, m=30, c=64)
    common = dict(ridge=ridge, num_iters=1, sinkhorn_iters=200, lam=0.3)
    closed = _refine(bank, query, m_step="closed_form", **common)
    sgd = _refine(bank, query, m_step="optax", optimizer="sgd", inner_steps=3000, **common)
    np.testing.assert_allclose(np.asarray(sgd.w), np.asarray(closed.w), rtol=0, atol=2e-5)


@pytest.mark.parametrize("ridge", [1e-4, 1e-2])
def test_one_preconditioned_newton_step_reaches_the_closed_form(rng, ridge):
    bank, query, _, _ = problem(rng, n=16, m=30, c=64)
    common = dict(ridge=ridge, num_iters=1, sinkhorn_iters=200, lam=0.3)
    closed = _refine(bank, query, m_step="closed_form", **common)
    # A Newton step is exact up to the plan's column sums (1/m at convergence).
    newton = _refine(
        bank, query, m_step="optax", optimizer="preconditioned", inner_steps=1, **common
    )
    np.testing.assert_allclose(np.asarray(newton.w), np.asarray(closed.w), rtol=0, atol=1e-4)


def test_few_plain_sgd_steps_stay_near_w_only(rng):
    """SPEC 8: with ill-conditioned G, 10 plain steps barely leave W0."""
    basis = rng.standard_normal((16, 64)) * np.logspace(0, -2, 16)[:, None]
    bank = rng.standard_normal((16, 16)) @ basis
    query = rng.standard_normal((30, 16)) @ basis
    common = dict(num_iters=1, sinkhorn_iters=100, ridge=1e-4)  # SPEC 8's ridge
    w_only = _refine(bank, query, use_transport=False, ridge=1e-4)
    closed = _refine(bank, query, m_step="closed_form", **common)
    sgd = _refine(bank, query, m_step="optax", optimizer="sgd", inner_steps=10, **common)
    to_w0 = np.linalg.norm(np.asarray(sgd.w - w_only.w))
    to_closed = np.linalg.norm(np.asarray(sgd.w - closed.w))
    assert to_w0 < 0.5 * to_closed


def test_w_only_returns_the_least_squares_init(rng):
    bank, query, _, _ = problem(rng)
    out = _refine(bank, query, use_transport=False)
    cfg = RefineConfig()
    sys = rf.gram_system(jnp.asarray(bank, jnp.float32), jnp.asarray(query, jnp.float32), cfg)
    np.testing.assert_allclose(
        np.asarray(out.w), np.asarray(rf.least_squares_init(sys)), rtol=1e-6, atol=1e-6
    )


def test_duplicate_prototypes_stay_finite(rng):
    bank, query, _, _ = problem(rng, n=10, c=30)
    bank = np.concatenate([bank, bank, bank[:3]])  # singular Gram
    for kw in [{}, {"m_step": "optax"}, {"distance": "cosine", "m_step": "optax"}]:
        out = _refine(bank, query, **kw)
        assert np.isfinite(np.asarray(out.w)).all()
        assert np.isfinite(float(out.marginal_error))


@pytest.mark.parametrize("sinkhorn_mode", ["absorbed", "log"])
def test_exactly_reproduced_query_stays_finite(sinkhorn_mode):
    # WinCLIP+ calibration on a tiny random CLIP: every bank row the same
    # unit-scale vector, the held-out patches within 1e-4 of it, so every
    # cosine cost is 0 or one rounding step (3e-8). The E-step's epsilon
    # then sat on the old 1e-12 floor (5e-14), the absorbed Sinkhorn's
    # exponents (f + g - C) / eps amplified rounding noise to inf and the
    # scores came out NaN (under the suite's -O0 XLA backend).
    rng = np.random.default_rng(7)
    v = rng.standard_normal(16).astype(np.float32) * 0.3
    bank = np.stack([v, v, v])
    query = v + 1e-4 * rng.standard_normal((2, 16)).astype(np.float32)
    cfg = dict(lam=0.1, epsilon=0.05, ridge=0.01, ridge_wide=0.01, distance="cosine")
    out = _refine(bank, query, m_step="optax", sinkhorn_mode=sinkhorn_mode, **cfg)
    w = np.asarray(out.w)
    assert np.isfinite(w).all() and np.isfinite(float(out.marginal_error))
    # Every refined prototype is (nearly) the shared row: W's rows sum to ~1.
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=0, atol=2e-2)


def test_cosine_cost_is_never_negative():
    # Repeated rows and nonnegative W: every refined row is parallel to every
    # prototype, and rounding put the old cosine cost at -6e-8 (seeds 2, 6).
    cfg = RefineConfig(distance="cosine", m_step="optax")
    for seed in range(8):
        rng = np.random.default_rng(seed)
        bank = np.repeat(rng.standard_normal((1, 64)).astype(np.float32), 5, axis=0)
        sys = rf.gram_system(jnp.asarray(bank), jnp.asarray(bank * 1.0001), cfg)
        w = jnp.asarray(rng.random((5, 5)).astype(np.float32))
        cost = np.asarray(rf.proto_to_refined(sys, w, cfg))
        assert (cost >= 0.0).all(), (seed, cost.min())
        np.testing.assert_allclose(cost, 0.0, rtol=0, atol=1e-6)


def test_em_diagnostics_are_reported(rng):
    bank, query, _, _ = problem(rng, n=16, m=30, c=64)
    out = _refine(bank, query, num_iters=10, sinkhorn_iters=100)
    assert 0.0 <= float(out.marginal_error) < 1e-2
    assert 0.0 <= float(out.w_rel_change) < 1.0
    assert 0.0 < float(out.lsq_residual) < 1.0


@pytest.mark.parametrize(
    ("precision", "rtol"), [("float32", 1e-6), ("tf32", 1e-6), ("bfloat16", 2e-2)]
)
def test_feature_products_in_each_precision(rng, precision, rtol):
    x = rng.standard_normal((30, 200)).astype(np.float32)
    y = rng.standard_normal((20, 200)).astype(np.float32)
    got = np.asarray(rf.feature_products(jnp.asarray(x), jnp.asarray(y), precision))
    ref = x.astype(np.float64) @ y.astype(np.float64).T
    scale = np.sqrt((x**2).sum(1))[:, None] * np.sqrt((y**2).sum(1))[None, :]
    assert got.dtype == np.float32
    assert np.max(np.abs(got - ref) / scale) < rtol


@pytest.mark.parametrize(
    ("distance", "m_step", "query_scale"),
    [
        ("sqeuclidean", "closed_form", 2.0**20),
        ("sqeuclidean", "optax", 2.0**-20),
        ("cosine", "optax", 1.0),
    ],
)
def test_refined_sq_norms_from_the_loop_equal_float64_feature_space_norms(
    rng, distance, m_step, query_scale
):
    """`Refinement.refined_sq` (reused by the scoring) is `||W M||^2` of the returned W."""
    bank, query, _, _ = problem(rng, n=16, m=30, c=64)
    cfg = RefineConfig(distance=distance, m_step=m_step, num_iters=3)
    sys = rf.gram_system(
        jnp.asarray(bank, jnp.float32), jnp.asarray(query * query_scale, jnp.float32), cfg
    )
    out = rf.refine(sys, cfg)
    w = np.asarray(out.w, np.float64)
    rows = bank / np.linalg.norm(bank, axis=1, keepdims=True) if distance == "cosine" else bank
    ref = ((w @ rows) ** 2).sum(1)  # float64, in the caller's units
    got = np.asarray(out.refined_sq, np.float64) * float(sys.scale_sq)
    np.testing.assert_allclose(got, ref, rtol=2e-5)
    np.testing.assert_allclose(
        np.asarray(out.refined_sq), np.asarray(rf.refined_sq_norms(sys, out.w)), rtol=2e-6
    )


def test_closed_form_rows_minimise_the_float64_feature_space_loss(rng):
    """The closed form against the independent numpy loss: no direction lowers it."""
    bank, query, _, plan = problem(rng)
    lam = 0.3
    cfg = RefineConfig(lam=lam)
    with jax.enable_x64(True):
        sys = rf.gram_system(
            jnp.asarray(bank), jnp.asarray(query), cfg.replace(precision="float64")
        )
        w0 = rf.least_squares_init(sys)
        plan_t = jnp.asarray(plan.T)
        w = np.asarray(rf.closed_form_rows(w0, plan_t, plan_t.sum(axis=1), cfg))
        delta = float(sys.delta) * float(sys.scale_sq)
        # SPEC 3.2's form at exact marginals: (W0 + lam m T^T) / (1 + lam).
        m = w.shape[0]
        exact = jnp.asarray(plan / plan.sum(axis=0, keepdims=True) / m)
        w_exact = rf.closed_form_rows(w0, exact.T, jnp.full((m,), 1.0 / m), cfg)
        spec = (w0 + lam * m * exact.T) / (1 + lam)
    np.testing.assert_allclose(w_exact, spec, rtol=1e-10, atol=1e-14)
    args = (plan, bank, query, "sqeuclidean", lam, delta)
    best = numpy_loss(w, *args)
    for step in rng.standard_normal((5, *w.shape)) * 1e-3:  # a minimum: every move costs
        assert numpy_loss(w + step, *args) > best
        assert numpy_loss(w - step, *args) > best
