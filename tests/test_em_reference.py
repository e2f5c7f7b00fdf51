"""The whole EM loop of `refine.refine` against an independent float64 reference.

The reference works in feature space, as docs/method.md states the method
("Objective", "The ridge rule", "Sinkhorn (E-step)"), and shares no code with
the package:

- ridge `delta = rel * trace(M M^T) / n`, `rel = ridge_wide` when `n >= c`,
  else `ridge`;
- `W0` = argmin `||F - W M||^2 + delta ||W||^2`, by least squares on the
  ridge-augmented rows `[M_i, sqrt(delta) e_i]` and `[F_j, 0]`;
- E-step: cost `C[i, j] = ||M_i - R_j||^2` with `R = W M`, entropic Sinkhorn
  at `epsilon * mean(C)` with uniform marginals, log domain, `g` then `f`
  each iteration, warm-started from the previous E-step's potentials (zero
  at the first);
- M-step: `W` = argmin `(1/m) ||F - W M||^2 + lam <T, C(W)>`, both terms in
  the ridge-augmented space. Row `j` of the loss is a weighted sum of squared
  distances from `W_j M_aug` to the targets `F_aug_j` (weight `1/m`) and
  `M_aug_i` (weights `lam T_ij`), i.e. the total weight times the distance to
  their weighted mean plus a constant: a least-squares problem per row,
  solved with `np.linalg.lstsq` (no Gram matrix, no closed form of the code).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from protorefine_jax import RefineConfig
from protorefine_jax import refine as rf


def reference_em(bank, query, lam, epsilon, ridge, ridge_wide, num_iters, sinkhorn_iters):
    """Float64 feature-space EM; returns `W [m, n]` and the last plan `T [n, m]`."""
    n, c = bank.shape
    m = query.shape[0]
    rel = ridge_wide if n >= c else ridge
    delta = rel * np.sum(bank * bank) / n
    bank_aug = np.concatenate([bank, np.sqrt(delta) * np.eye(n)], axis=1)  # [n, c + n]
    query_aug = np.concatenate([query, np.zeros((m, n))], axis=1)  # [m, c + n]

    def fit(targets):
        """argmin_W ||targets - W bank_aug||^2, row by row (bank_aug has full row rank)."""
        return np.linalg.lstsq(bank_aug.T, targets.T, rcond=None)[0].T

    w = fit(query_aug)
    log_a, log_b = np.full(n, -np.log(n)), np.full(m, -np.log(m))
    f, g = np.zeros(n), np.zeros(m)
    plan = None
    for _ in range(num_iters):
        refined = w @ bank  # [m, c], plain feature space
        cost = ((bank[:, None, :] - refined[None, :, :]) ** 2).sum(-1)  # [n, m]
        eps = epsilon * cost.mean()
        for _ in range(sinkhorn_iters):
            g = eps * log_b - eps * logsumexp((f[:, None] - cost) / eps, axis=0)
            f = eps * log_a - eps * logsumexp((g[None, :] - cost) / eps, axis=1)
        plan = np.exp((f[:, None] + g[None, :] - cost) / eps)
        weight = 1.0 / m + lam * plan.sum(axis=0)  # [m]
        targets = (query_aug / m + lam * plan.T @ bank_aug) / weight[:, None]
        w = fit(targets)
    return w, plan


def reference_loss(w, plan, bank, query, lam, delta):
    """The M-step loss in the ridge-augmented feature space (float64)."""
    n = bank.shape[0]
    bank_aug = np.concatenate([bank, np.sqrt(delta) * np.eye(n)], axis=1)
    query_aug = np.concatenate([query, np.zeros((query.shape[0], n))], axis=1)
    refined = w @ bank_aug
    recon = ((query_aug - refined) ** 2).sum(-1).mean()
    cost = ((bank_aug[:, None, :] - refined[None, :, :]) ** 2).sum(-1)
    return recon + lam * np.sum(plan * cost)


def problem(seed, n, m, c):
    """A bank and a query that is mostly normal (near bank rows) with a few outliers."""
    rng = np.random.default_rng(seed)
    bank = rng.standard_normal((n, c))
    mix = rng.dirichlet(np.ones(n) * 0.3, size=m)
    query = mix @ bank + 0.1 * rng.standard_normal((m, c))
    query[:3] += 2.0 * rng.standard_normal((3, c))  # anomalous patches
    return bank, query


def run_refine(bank, query, cfg, float64):
    if float64:
        with jax.enable_x64(True):
            cfg = cfg.replace(precision="float64")
            sys = rf.gram_system(jnp.asarray(bank), jnp.asarray(query), cfg)
            out = rf.refine(sys, cfg)
            return np.asarray(out.w, np.float64), float(out.marginal_error)
    sys = rf.gram_system(jnp.asarray(bank, jnp.float32), jnp.asarray(query, jnp.float32), cfg)
    out = rf.refine(sys, cfg)
    return np.asarray(out.w, np.float64), float(out.marginal_error)


# (n, c): a wide bank (n >= c: `ridge_wide`) and a narrow one (`ridge`).
SHAPES = {"wide": (12, 8), "narrow": (12, 16)}
M_PATCHES = 20
SINKHORN_ITERS = 30
# Max |W - W_ref| relative to max |W_ref|. Reached on these 12 cases: float64
# <= 1e-13 (rounding only: same iterates); float32 <= 1.3e-5 in either
# Sinkhorn mode. Deliberate slips in the reference (ridge rule ignored,
# absolute epsilon, no warm start, `f` updated before `g`, the closed form at
# exact marginals) move W by 1.7e-2 to 0.35.
TOL_FLOAT64 = 1e-11
TOL_FLOAT32 = 5e-5


@pytest.mark.parametrize("shape", ["wide", "narrow"])
@pytest.mark.parametrize("lam", [0.1, 0.3, 1.0])
@pytest.mark.parametrize("num_iters", [3, 6])
def test_em_loop_matches_the_float64_feature_space_reference(shape, lam, num_iters):
    n, c = SHAPES[shape]
    bank, query = problem(int(lam * 10) + num_iters + c, n, M_PATCHES, c)
    cfg = RefineConfig(
        lam=lam, num_iters=num_iters, sinkhorn_iters=SINKHORN_ITERS, sinkhorn_mode="log"
    )
    args = (bank, query, lam, cfg.epsilon, cfg.ridge, cfg.ridge_wide)
    w_ref, _ = reference_em(*args, num_iters, SINKHORN_ITERS)
    w_init, _ = reference_em(*args, 0, SINKHORN_ITERS)
    scale = np.abs(w_ref).max()
    # The loop moves W away from W0: the comparison is not of the init alone.
    assert np.abs(w_ref - w_init).max() > 0.05 * scale

    w64, _ = run_refine(bank, query, cfg, float64=True)
    np.testing.assert_allclose(w64, w_ref, rtol=0, atol=TOL_FLOAT64 * scale)
    # float32, in the log domain and in the shipped absorbed mode (same plan).
    for mode in ("log", "absorbed"):
        w32, _ = run_refine(bank, query, cfg.replace(sinkhorn_mode=mode), float64=False)
        np.testing.assert_allclose(w32, w_ref, rtol=0, atol=TOL_FLOAT32 * scale, err_msg=mode)


@pytest.mark.parametrize("shape", ["wide", "narrow"])
def test_reference_m_step_minimises_the_augmented_loss(shape):
    """The reference's least-squares M-step is the minimiser of its loss."""
    n, c = SHAPES[shape]
    bank, query = problem(1, n, M_PATCHES, c)
    lam, cfg = 0.3, RefineConfig()
    w, plan = reference_em(bank, query, lam, cfg.epsilon, cfg.ridge, cfg.ridge_wide, 2, 30)
    rel = cfg.ridge_wide if n >= c else cfg.ridge
    delta = rel * np.sum(bank * bank) / n
    best = reference_loss(w, plan, bank, query, lam, delta)
    rng = np.random.default_rng(0)
    for step in rng.standard_normal((5, *w.shape)) * 1e-4:  # every move costs
        assert reference_loss(w + step, plan, bank, query, lam, delta) > best
        assert reference_loss(w - step, plan, bank, query, lam, delta) > best
