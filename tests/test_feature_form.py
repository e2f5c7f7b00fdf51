"""The feature form of the refinement (`RefineConfig.products`) against references.

The feature form forms every product with `G = M M^T` as `(W M) M^T` and the
ridge solve in the `[c, c]` space (`gram.ridge_solution`); the Gram form is
the one `tests/test_em_reference.py` checks. Both are checked here against the
same float64 feature-space EM (no code shared with the package), and the
feature form's program is checked to hold no `[n, n]` array.
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from test_em_reference import problem, reference_em

from protorefine_jax import RefineConfig
from protorefine_jax import gram as gr
from protorefine_jax import refine as rf
from protorefine_jax.calibration import ScoreCalibration
from protorefine_jax.pipeline import score_query
from protorefine_jax.scoring import refined_patch_scores

SINKHORN_ITERS = 30
# Max |W - W_ref| / max |W_ref|, the Gram form's tolerances of
# tests/test_em_reference.py (reached here: float64 <= 1e-13, float32 <= 2e-5).
TOL_FLOAT64 = 1e-11
TOL_FLOAT32 = 5e-5


def _w(bank, query, cfg, float64):
    if float64:
        with jax.enable_x64(True):
            cfg = cfg.replace(precision="float64")
            sys = rf.gram_system(jnp.asarray(bank), jnp.asarray(query), cfg)
            return np.asarray(rf.refine(sys, cfg).w, np.float64), sys
    sys = rf.gram_system(jnp.asarray(bank, jnp.float32), jnp.asarray(query, jnp.float32), cfg)
    return np.asarray(rf.refine(sys, cfg).w, np.float64), sys


# (n, c): wide (n > 2c, where "auto" takes the features) and narrow (n < c).
@pytest.mark.parametrize("n, c", [(24, 8), (10, 16)])
def test_feature_form_em_matches_the_float64_reference(n, c):
    bank, query = problem(n + c, n, 20, c)
    cfg = RefineConfig(
        num_iters=4, sinkhorn_iters=SINKHORN_ITERS, sinkhorn_mode="log", products="features"
    )
    w_ref, _ = reference_em(bank, query, cfg.lam, cfg.epsilon, cfg.ridge, cfg.ridge_wide, 4, 30)
    scale = np.abs(w_ref).max()
    w64, sys = _w(bank, query, cfg, float64=True)
    assert sys.feature_form and sys.gram is None and sys.chol is None
    np.testing.assert_allclose(w64, w_ref, rtol=0, atol=TOL_FLOAT64 * scale)
    for mode in ("log", "absorbed"):
        w32, _ = _w(bank, query, cfg.replace(sinkhorn_mode=mode), float64=False)
        np.testing.assert_allclose(w32, w_ref, rtol=0, atol=TOL_FLOAT32 * scale, err_msg=mode)


def test_ridge_solution_is_the_ridge_regression():
    """`W0 = argmin ||F - W M||^2 + delta ||W||^2` in float64 (normal equations in numpy)."""
    rng = np.random.default_rng(3)
    bank, query = 4.0 * rng.standard_normal((40, 8)), 0.01 * rng.standard_normal((30, 8))
    with jax.enable_x64(True):
        cfg = RefineConfig(precision="float64", products="features")
        sys = rf.gram_system(jnp.asarray(bank), jnp.asarray(query), cfg)
        w0 = np.asarray(gr.ridge_solution(sys))
    delta = cfg.ridge_wide * np.sum(bank * bank) / len(bank)
    want = query @ bank.T @ np.linalg.inv(bank @ bank.T + delta * np.eye(len(bank)))
    np.testing.assert_allclose(w0, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


def test_auto_takes_the_features_above_twice_the_feature_dimension():
    cfg = RefineConfig()
    assert not gr.uses_feature_form(cfg, 304, 152) and gr.uses_feature_form(cfg, 305, 152)
    assert not gr.uses_feature_form(cfg.replace(products="gram"), 10_000, 152)
    assert gr.uses_feature_form(cfg.replace(products="features"), 4, 152)
    optax = cfg.replace(m_step="optax")
    assert not gr.uses_feature_form(optax, 10_000, 152)  # its loss is written against G
    with pytest.raises(ValueError, match='products="features" needs m_step="closed_form"'):
        RefineConfig(products="features", m_step="optax")
    with pytest.raises(ValueError, match="products must be one of"):
        RefineConfig(products="rows")


def _scores(bank, query, cfg, calibration=None):
    fn = jax.jit(lambda b, q: score_query(b, q, cfg, calibration).patch_scores)
    return np.asarray(fn(jnp.asarray(bank), jnp.asarray(query)), np.float64)


@pytest.mark.parametrize("bank_mode", ["refined", "union"])
def test_both_forms_give_the_same_scores(bank_mode):
    """Patch scores (refined, union, calibrated fusion) of the two forms, float32.

    Features of a Lite0-like scale (non-negative, `c = 24`) and a bank of
    `n = 64 > 2c`. The forms round differently: measured max relative
    difference 2e-6; bound 1e-4 of the largest score.
    """
    rng = np.random.default_rng(5)
    c, n = 24, 64
    bank = np.abs(rng.standard_normal((n, c))).astype(np.float32)
    query = np.abs(rng.standard_normal((36, c))).astype(np.float32)
    query[:2] += 3.0
    cal = ScoreCalibration(*(jnp.asarray(v, jnp.float32) for v in (1.0, 0.5, 0.8, 0.3, 1.0)))
    for calibration in (None, cal):
        base = RefineConfig(bank=bank_mode, image_size=None)
        gram = _scores(bank, query, base.replace(products="gram"), calibration)
        feat = _scores(bank, query, base.replace(products="features"), calibration)
        assert np.abs(feat - gram).max() <= 1e-4 * np.abs(gram).max()
        # Not the host's scores: the refinement ran in both.
        host = _scores(bank, query, base.replace(use_refinement=False))
        assert np.abs(gram - host).max() > 1e-2 * np.abs(host).max()


def test_zero_weight_rows_take_part_in_nothing_in_either_form():
    """A masked bank (the hold-outs cut from the deployed coreset) scores as its used rows."""
    rng = np.random.default_rng(7)
    c = 8
    bank = np.abs(rng.standard_normal((40, c))).astype(np.float32)
    query = np.abs(rng.standard_normal((16, c))).astype(np.float32)
    used = np.zeros(40, bool)
    used[::2] = True
    masked = np.where(used[:, None], bank, 0.0)
    weights = jnp.asarray(used / used.sum(), jnp.float32)
    cfg = RefineConfig(products="features", image_size=None)
    with gr.matmul_precision(cfg):
        sys = rf.gram_system(jnp.asarray(masked), jnp.asarray(query), cfg, weights=weights)
        ref = rf.refine(sys, cfg)
        got = np.asarray(refined_patch_scores(sys, ref.w, cfg, ref.refined_sq))
    assert np.abs(np.asarray(ref.w)[:, ~used]).max() == 0.0
    want = _scores(bank[used], query, cfg)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def test_feature_form_holds_no_n_by_n_array():
    """The point of the form: at n = 512, c = 8 no `[512, 512]` value in the program."""
    n, c = 512, 8
    bank, query = jnp.ones((n, c)), jnp.ones((64, c))

    def shapes(cfg):
        jaxpr = jax.make_jaxpr(lambda b, q: score_query(b, q, cfg).patch_scores)(bank, query)
        seen = set()

        def walk(jp):
            for eqn in jp.eqns:
                seen.update(tuple(v.aval.shape) for v in eqn.outvars)
                for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                    walk(sub)

        walk(jaxpr.jaxpr)
        return seen

    assert (n, n) in shapes(RefineConfig(products="gram", image_size=None))
    assert (n, n) not in shapes(RefineConfig(image_size=None))  # "auto": n > 2c


def test_the_benchmark_reports_both_forms():
    """`experiments.bench_products` on a tiny problem: both forms timed, scores agreeing."""
    from experiments import bench_products

    rows = bench_products.run([16, 40], m=16, c=8, repeats=1, gram_max=16)
    assert [r["n"] for r in rows] == [16, 40]
    assert rows[0]["gram_ms"] > 0 and rows[0]["max_rel_diff"] < 1e-4
    assert "gram_ms" not in rows[1] and rows[1]["features_ms"] > 0
