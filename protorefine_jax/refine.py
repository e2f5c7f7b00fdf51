"""Prototype refinement for one query: least-squares init, then the EM loop.

Everything runs in Gram space. With `G = M M^T [n, n]` and `P = F M^T [m, n]`,
every quantity the method needs is an inner product of rows of `F`, `M` and
`R = W M`:

    <R_j, R_k> = (W G W^T)_jk,   <M_i, R_j> = (G W^T)_ij,   <F_j, R_k> = (P W^T)_jk

so one EM iteration costs `O(n^2 m)` instead of `O(n m c)`, and the refined
prototypes `[m, c]` are never formed. For the cosine distance `F` and `M` are
row-normalised first (`<x, y>` then is a cosine for the unit rows).

That is the cheaper road while `n <= 2c` (every few-shot bank). Larger banks
(a fit on tens to hundreds of good images) take the feature form
(`RefineConfig.products`, `gram.uses_feature_form`): the same algebra, with
every `W G` formed as `(W M) M^T` and the ridge solve in the `[c, c]` space,
`O(n m c)` per iteration and no `[n, n]` array.

The ridge `delta` (docs/method.md, "The ridge rule") is one regulariser used
consistently: the M-step loss is evaluated in the ridge-augmented space where
each prototype is `[M_i, sqrt(delta) e_i]` and each patch `[F_j, 0]`, i.e.
with `G + delta I` in place of `G`. That adds `delta ||W_j||^2` to the reconstruction term (ridge
regression: its minimiser is `W0`) and `delta ||e_i - W_j||^2` to the
transport term, so the closed form is the exact minimiser of the same loss
the optax steps descend. Distances in the E-step and in the scores are the
plain feature-space ones.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float

from protorefine_jax.config import RefineConfig

# The Gram-space algebra lives in `gram`; re-exported for existing callers.
from protorefine_jax.gram import (  # noqa: F401
    _EPS,
    GramSystem,
    feature_products,
    gram_system,
    gram_times,
    in_bank_units,
    matmul_precision,
    normalize_rows,
    refined_sq_norms,
    ridge_solution,
    ridge_solve,
    times_pow2,
)
from protorefine_jax.transport import sinkhorn_plan, sinkhorn_t


class Refinement(NamedTuple):
    """Result of refining the bank for one query.

    Attributes:
      w: `[m, n]` transform `W*`; the refined prototypes are `R = W* M`.
      marginal_error: relative Sinkhorn marginal error of the last E-step.
      w_rel_change: `||W_N - W_{N-1}|| / ||W_{N-1}||` (Frobenius) of the last
        EM iteration: small means the loop has settled.
      lsq_residual: relative residual `||F - W0 M|| / ||F||` of the
        least-squares init; near 0 means the bank reproduces the query
        exactly (the degenerate regime: RESULTS.md, "The degenerate regime and
        its remedy").
      refined_sq: `[m]` `||R_j||^2` of the refined prototypes in the
        system's units (`gram.refined_sq_norms`), a by-product of the EM
        loop's last product that the scoring reuses; None without the loop.
    """

    w: Float[Array, "m n"]
    marginal_error: Float[Array, ""]
    w_rel_change: Float[Array, ""]
    lsq_residual: Float[Array, ""]
    refined_sq: Float[Array, " m"] | None = None


def least_squares_init(sys: GramSystem) -> Float[Array, "m n"]:
    """`W0 = P (G + delta I)^-1`, the ridge solution (the paper's `(M^T M)^-1` is a typo).

    The ridge `delta`: docs/method.md, "The ridge rule".
    """
    return ridge_solution(sys)


def proto_to_refined(
    sys: GramSystem, w: Float[Array, "m n"], config: RefineConfig
) -> Float[Array, "n m"]:
    """Cost `C[i, j] = d(M_i, R_j)` of the E-step (docs/method.md, "Objective")."""
    return refined_to_proto(sys, w, config).T


def refined_to_proto(
    sys: GramSystem, w: Float[Array, "m n"], config: RefineConfig
) -> Float[Array, "m n"]:
    """`C^T [m, n]`, the E-step's cost in the refinement's layout (`proto_to_refined`).

    One `[m, n] x [n, n]` product: `W G` gives both the cross terms and,
    since `G` is symmetric, `||R_j||^2 = sum_i W_ji (W G)_ji`. With `W`
    batched and `G` not (`gram.in_bank_units`), a vmapped batch is one GEMM
    `[B m, n] x [n, n]` and its output needs no transpose.
    """
    return _cost_t(sys, w, gram_times(sys, w), config)[0]


def _cost_t(sys: GramSystem, w, dots, config: RefineConfig):
    """`(C^T [m, n], ||R_j||^2 [m])` from `dots = W G` (`refined_to_proto`)."""
    r_sq = jnp.sum(dots * w, axis=1)
    if config.distance == "sqeuclidean":
        return jnp.maximum(r_sq[:, None] + sys.m_sq[None, :] - 2.0 * dots, 0.0), r_sq
    norms = jnp.sqrt(jnp.maximum(r_sq[:, None] * sys.m_sq[None, :], _EPS))
    # (1 - cos) / 2 >= 0; rounding can push a cosine of near-parallel rows
    # past 1, and a negative cost of -1e-8 over an epsilon of 1e-13 overflows
    # the Sinkhorn kernel. Clamped like the squared-Euclidean branch.
    return jnp.maximum(0.5 * (1.0 - dots / norms), 0.0), r_sq


def cost_resolution(sys: GramSystem, config: RefineConfig) -> Float[Array, ""]:
    """Smallest mean cost that is not rounding noise: the E-step's epsilon floor.

    Costs are differences of terms of size `s` (1 for the cosine distance,
    the mean squared prototype norm for the squared Euclidean one), so each
    carries a rounding error of a few ulps of `s`. When the query is
    reproduced exactly (every cost ~0) an epsilon below that scale makes the
    plan a function of the noise and the Sinkhorn exponents `(f + g - C) / eps`
    huge (overflow, then `inf - inf`); `64 ulp(s)` keeps it finite and, being
    ~1e-4 of a real mean cost (0.05 to 0.5), leaves non-degenerate inputs unchanged.
    """
    if config.distance == "sqeuclidean":
        used = jnp.maximum(jnp.sum(sys.weights > 0), 1)
        scale = jnp.maximum(jnp.sum(jnp.where(sys.weights > 0, sys.m_sq, 0.0)) / used, _EPS)
    else:
        scale = jnp.ones((), sys.dtype)
    return 64.0 * jnp.finfo(sys.dtype).eps * scale


def self_distance(sys: GramSystem, w: Float[Array, "m n"], config: RefineConfig):
    """`d(F_j, R_j)` for every patch `j` (the reconstruction term), `[m]`."""
    dots = jnp.sum(sys.cross * w, axis=-1)
    r_sq = refined_sq_norms(sys, w)
    if config.distance == "sqeuclidean":
        return sys.f_sq + r_sq - 2.0 * dots
    return 0.5 * (1.0 - dots / jnp.sqrt(jnp.maximum(sys.f_sq * r_sq, _EPS)))


def ridge_augmented(sys: GramSystem) -> GramSystem:
    """The system of `[M, sqrt(delta) I]` and `[F, 0]` (see the module docstring; Gram form)."""
    if sys.feature_form:
        raise ValueError(
            'the optax M-step runs in the Gram form: RefineConfig(products="auto" or "gram").'
        )
    eye = jnp.eye(sys.gram.shape[0], dtype=sys.gram.dtype)
    bank_gram = sys.bank_gram + times_pow2(sys.delta, -2 * sys.shift) * eye
    return sys._replace(
        gram=sys.gram + sys.delta * eye, m_sq=sys.m_sq + sys.delta, bank_gram=bank_gram
    )


def m_step_loss(
    w: Float[Array, "m n"], plan: Float[Array, "n m"], sys: GramSystem, config: RefineConfig
) -> Float[Array, ""]:
    """`L(W) = (1/m) sum_j d(F_j, R_j) + lam sum_ij T_ij d(M_i, R_j)`.

    The objective of docs/method.md, "Objective", evaluated in the
    ridge-augmented space (module docstring), so that `W0` minimises the
    reconstruction term and the closed form the whole loss.

    Args:
      w: `[m, n]` transform.
      plan: `[n, m]` transport plan, held fixed.
      sys: Gram system of the query.
      config: distance and `lam`.

    Returns:
      The scalar loss.
    """
    aug = ridge_augmented(sys)
    recon = jnp.mean(self_distance(aug, w, config))
    transport = jnp.sum(jax.lax.stop_gradient(plan) * proto_to_refined(aug, w, config))
    return recon + config.lam * transport


def closed_form_rows(
    w0: Float[Array, "m n"],
    plan_t: Float[Array, "m n"],
    col: Float[Array, " m"],
    config: RefineConfig,
) -> Float[Array, "m n"]:
    """Exact minimiser of the squared-Euclidean M-step loss (`m_step_loss`).

    Setting the gradient of `L` to zero gives, row by row,
    `W_j = ((1/m) W0_j + lam T^T_j) / (1/m + lam c_j)` with `c_j = sum_i T_ij`.
    At exact marginals (`c_j = 1/m`) this is
    `W = (W0 + lam m T^T) / (1 + lam)`; using the plan's actual column sums
    keeps it the exact fixed point of the gradient steps.

    Args:
      w0: `[m, n]` least-squares init.
      plan_t: `[m, n]` transposed transport plan `T^T` (the E-step's layout).
      col: `[m]` its row sums `c_j` (the plan's refined-side marginal).
      config: `lam`.

    Returns:
      `[m, n]` the new transform.
    """
    m = w0.shape[0]
    return (w0 / m + config.lam * plan_t) / (1.0 / m + config.lam * col)[:, None]


def _lambda_max(sys: GramSystem, num_iters: int = 30) -> Float[Array, ""]:
    """Largest eigenvalue of `G + delta I` by power iteration (cheap, `O(n^2)`)."""
    n = sys.gram.shape[0]
    v0 = jnp.ones((n,), sys.gram.dtype) / jnp.sqrt(n)

    def body(_, v):
        u = sys.gram @ v + sys.delta * v
        return u / jnp.maximum(jnp.linalg.norm(u), _EPS)

    v = jax.lax.fori_loop(0, num_iters, body, v0)
    return v @ (sys.gram @ v) + sys.delta


def preconditioned_gradient(
    w: Float[Array, "m n"],
    w0: Float[Array, "m n"],
    plan: Float[Array, "n m"],
    sys: GramSystem,
    config: RefineConfig,
) -> Float[Array, "m n"]:
    """`grad_W L(W) (G + delta I)^-1` of `m_step_loss`, without autodiff or solves.

    With `A = G + delta I` (the ridge-augmented Gram matrix), every gradient
    term of the loss is a row-scaled `W A`, `P` or `T^T A`; multiplied by
    `A^-1` on the right these become `W`, `W0 = P A^-1` and `T^T`. Only the
    norms `||R_j||^2 = (W A W^T)_jj` and, for the cosine, the cross terms
    `(W A)_ji` need the one product `W A` per step. Squared Euclidean:
    `(2/m)(W - W0) + 2 lam (c_j W_j - T^T_j)` with `c_j = sum_i T_ij`.
    Cosine (`d = (1 - cos) / 2`, `r_j = ||R_j||^2`, `s_i = ||M_i||^2 + delta`):
    row `j` is
    `-(1/2m) (W0_j - (p_j / r_j) W_j) / sqrt(f_j r_j)
     - (lam/2) (sum_i T_ij (e_i - ((WA)_ji / r_j) W_j) / sqrt(s_i)) / sqrt(r_j)`
    with `p_j = <F_j, R_j>`. Tested against `jax.grad(m_step_loss)` times
    the inverse.

    Args:
      w: `[m, n]` current transform.
      w0: `[m, n]` least-squares init `P A^-1`.
      plan: `[n, m]` transport plan (held fixed).
      sys: Gram system of the query (not augmented).
      config: distance and `lam`.

    Returns:
      `[m, n]` the preconditioned gradient.
    """
    plan = jax.lax.stop_gradient(plan)
    m = w.shape[0]
    if config.distance == "sqeuclidean":
        col = jnp.sum(plan, axis=0)
        return (2.0 / m) * (w - w0) + 2.0 * config.lam * (col[:, None] * w - plan.T)
    aug = ridge_augmented(sys)
    wa = w @ aug.gram  # [m, n]
    r_sq = jnp.maximum(jnp.sum(wa * w, axis=-1), _EPS)
    p = jnp.sum(sys.cross * w, axis=-1)
    f_norm = jnp.sqrt(jnp.maximum(sys.f_sq, _EPS))
    r_norm = jnp.sqrt(r_sq)
    recon = (w0 - (p / r_sq)[:, None] * w) / (f_norm * r_norm)[:, None]
    tw = plan.T / jnp.sqrt(aug.m_sq)[None, :]  # [m, n]: T_ij / sqrt(s_i)
    proj = jnp.sum(tw * wa, axis=-1) / r_sq  # [m]
    transport = (tw - proj[:, None] * w) / r_norm[:, None]
    return -(0.5 / m) * recon - 0.5 * config.lam * transport


def optax_m_step(
    w: Float[Array, "m n"],
    plan: Float[Array, "n m"],
    sys: GramSystem,
    config: RefineConfig,
    w0: Float[Array, "m n"] | None = None,
) -> Float[Array, "m n"]:
    """`config.inner_steps` optax steps on the M-step loss, `T` fixed.

    docs/method.md, "M-step: closed form and optax".

    Args:
      w: `[m, n]` transform to start from.
      plan: `[n, m]` transport plan (no gradient flows into it).
      sys: Gram system of the query.
      config: optimizer, step size, steps.
      w0: the least-squares init `W0` if the caller has it (the
        preconditioned gradient needs it; computed when None).

    Returns:
      `[m, n]` the updated transform.
    """
    m = w.shape[0]
    if config.optimizer == "preconditioned":
        # Newton's step for the squared-Euclidean loss; (1 - cos)/2 between
        # near-unit vectors is ||x - y||^2 / 4, a quarter of the curvature.
        curvature = 1.0 if config.distance == "sqeuclidean" else 0.25
        step = config.lr * m / (2.0 * (1.0 + config.lam) * curvature)
        opt = optax.sgd(step)
        # The preconditioned gradient in closed form (one `[m, n] x [n, n]`
        # product per step instead of autodiff's several and a solve).
        w0 = least_squares_init(sys) if w0 is None else w0

        def direction(w):
            return preconditioned_gradient(w, w0, plan, sys, config)
    else:
        lipschitz = 2.0 * (1.0 + config.lam) * _lambda_max(sys) / m
        opt = optax.sgd(config.lr / lipschitz)

        def direction(w):
            return jax.grad(m_step_loss)(w, plan, sys, config)

    def body(_, carry):
        w, opt_state = carry
        updates, opt_state = opt.update(direction(w), opt_state, w)
        return optax.apply_updates(w, updates), opt_state

    w, _ = jax.lax.fori_loop(0, config.inner_steps, body, (w, opt.init(w)))
    return w


def init_products(sys: GramSystem, w0: Float[Array, "m n"]) -> Float[Array, "m n"]:
    """`W0 G` of the ridge solution `W0` without a product: `P - delta W0`.

    `W0 (G + delta I) = P` by definition, so `W0 G = P - delta W0`; it is as
    accurate as the product itself (the Cholesky solve is backward stable:
    its residual is of the size of the product's rounding).
    """
    return sys.cross - sys.delta * w0


def lsq_residual(sys: GramSystem, w0: Float[Array, "m n"]) -> Float[Array, ""]:
    """Relative residual `||F - W0 M||_F / ||F||_F` of the ridge solution `W0`.

    In the config's geometry. With `||R_j||^2 = (W0 G W0^T)_jj` and
    `W0 G = P - delta W0` (`init_products`):
    `||F - W0 M||^2 = sum ||F_j||^2 - <P, W0> - delta ||W0||^2`, all `O(mn)`.
    """
    dots = jnp.sum(sys.cross * w0)
    res = jnp.sum(sys.f_sq) - dots - sys.delta * jnp.sum(w0 * w0)
    return jnp.sqrt(jnp.maximum(res, 0.0) / jnp.maximum(jnp.sum(sys.f_sq), _EPS))


def refine(sys: GramSystem, config: RefineConfig) -> Refinement:
    """The EM loop for one query (docs/method.md, "Objective").

    E-step: Sinkhorn plan between `M` and `R = W M` (cost `d(M_i, R_j)`,
    `epsilon * mean(C)`). M-step: closed form or optax steps with `T` fixed.
    With `use_transport=False` the loss is the (ridge-regularised)
    reconstruction term alone, whose minimiser for the squared Euclidean
    distance is `W0` itself, so no loop runs ("W only"; for the cosine
    distance `W0` is the least-squares proxy of that minimiser).

    Args:
      sys: Gram system of the query.
      config: refinement settings.

    Returns:
      The refined transform and its diagnostics.
    """
    w0 = least_squares_init(sys)
    residual = lsq_residual(sys, w0)
    zero = jnp.zeros((), w0.dtype)
    if not config.use_transport:
        return Refinement(w0, zero, zero, residual)

    m = w0.shape[0]
    closed = config.m_step == "closed_form"
    # The closed form's E-step needs only the Gram side: in the bank's units
    # it is one GEMM for a whole vmapped batch (`gram.in_bank_units`; the
    # costs scale by an exact power of two, the plan does not change).
    e_sys = in_bank_units(sys) if closed else sys
    floor = cost_resolution(e_sys, config)

    def e_step(w, dots, f, g):
        """Plan `T^T [m, n]`, its row sums, the potentials and the marginal error."""
        cost_t = jax.lax.stop_gradient(_cost_t(e_sys, w, dots, config)[0])
        # epsilon relative to the mean cost over the used prototypes
        # (docs/method.md, "Sinkhorn (E-step)").
        mean_cost = jnp.sum(cost_t @ sys.weights) / m
        eps = config.epsilon * jnp.maximum(mean_cost, floor)
        if config.sinkhorn_mode == "absorbed":
            # Warm start: the absorbed mode's first update (g) reads only f.
            init_f = f if config.warm_start else None
            ot = sinkhorn_t(cost_t, eps, config.sinkhorn_iters, sys.weights, init_f)
            return ot.plan_t, ot.col, ot.f, ot.g, ot.marginal_error
        init = (f, g) if config.warm_start else None
        ot = sinkhorn_plan(
            cost_t.T, eps, config.sinkhorn_iters, a=sys.weights, init=init, mode="log"
        )
        return ot.plan.T, jnp.sum(ot.plan, axis=0), ot.f, ot.g, ot.marginal_error

    def em_iteration(_, carry):
        # `dots = W G` of the current W, formed at the end of the previous
        # iteration: the last one's serves the scoring's `||R_j||^2`.
        w, dots, _, f, g, _ = carry
        plan_t, col, f, g, marginal_error = e_step(w, dots, f, g)
        if closed:
            w_new = closed_form_rows(w0, plan_t, col, config)
        else:
            w_new = optax_m_step(w, plan_t.T, sys, config, w0)
        return w_new, gram_times(e_sys, w_new), w, f, g, marginal_error

    # Zero-weight prototypes start (and stay) at potential -inf: they must not
    # enter the first log-sum-exp of the warm-started Sinkhorn.
    f0 = jnp.where(sys.weights > 0, 0.0, -jnp.inf).astype(w0.dtype)
    g0 = jnp.zeros((m,), w0.dtype)
    dots0 = init_products(sys, w0)
    if closed:  # to the bank's units, like `e_sys`
        dots0 = times_pow2(dots0, -2 * sys.shift)
    carry = (w0, dots0, w0, f0, g0, zero)
    w, dots, w_prev, _, _, marg = jax.lax.fori_loop(0, config.num_iters, em_iteration, carry)
    change = jnp.linalg.norm(w - w_prev) / jnp.maximum(jnp.linalg.norm(w_prev), _EPS)
    refined_sq = jnp.sum(dots * w, axis=1)
    if closed:
        refined_sq = times_pow2(refined_sq, 2 * sys.shift)
    return Refinement(w, marg, change, residual, refined_sq)
