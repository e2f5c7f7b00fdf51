"""E-step: entropic optimal transport between prototypes and refined prototypes.

The plan `T [n, m]` couples the original prototypes `M` (marginal `a`,
uniform `1/n`) with the refined prototypes `R = W M` (marginal `b`, uniform
`1/m`), paper Eq. 4-5. Solved by ott-jax's Sinkhorn with a
fixed iteration count (`min_iterations == max_iterations`: ott then runs a
`scan`, so vmapped queries do not wait on each other's convergence), either
entirely in the log domain or, by default, in kernel mode stabilised by
re-absorption (`sinkhorn_plan`'s `mode`). The absorbed mode is written out
here (ott's update order, `g` then `f`): ott's per-iteration bookkeeping (a
`cond`, error buffers) cost more than the arithmetic for one query per call.

The absorbed mode runs on the transposed cost `C^T [m, n]` (`sinkhorn_t`),
the layout of the refinement's `W [m, n]`: the E-step's cost `W G` then comes
out of one GEMM without transposes for a whole vmapped batch, and the plan is
kept as its scaled kernel `diag(v) K diag(u)`, which XLA fuses into the
closed-form M-step (one `exp` pass and two transposes fewer per EM
iteration; docs/method.md, "Sinkhorn (E-step)").
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float
from ott.geometry import geometry
from ott.problems.linear import linear_problem
from ott.solvers.linear import sinkhorn


class TransportResult(NamedTuple):
    """Output of one E-step.

    Attributes:
      plan: `[n, m]` transport plan `T`.
      f: `[n]` dual potential of the prototypes (for warm starts).
      g: `[m]` dual potential of the refined prototypes.
      marginal_error: max relative violation of either marginal,
        `max(|T 1 - a| / a, |T^T 1 - b| / b)`.
    """

    plan: Float[Array, "n m"]
    f: Float[Array, " n"]
    g: Float[Array, " m"]
    marginal_error: Float[Array, ""]


# Kernel-mode iterations between two re-absorptions (one `exp` pass each).
ABSORB_EVERY = 10


class TransposedPlan(NamedTuple):
    """One absorbed-mode E-step in the refined prototypes' layout `[m, n]`.

    The plan is held as `T^T = diag(v) K diag(u)` (kernel and scalings of the
    last block): `plan_t` is that product, which XLA fuses into its one
    consumer (the closed-form M-step) instead of writing it out.

    Attributes:
      kernel_t: `[m, n]` kernel `K` of the last block.
      u: `[n]` prototype-side scaling of the last block.
      v: `[m]` refined-side scaling of the last block.
      f: `[n]` prototype potential, the scalings absorbed (for warm starts).
      g: `[m]` refined-prototype potential, likewise.
      col: `[m]` the plan's refined-side marginal `T^T 1` (`v * (K u)`).
      marginal_error: as `TransportResult.marginal_error`.
    """

    kernel_t: Float[Array, "m n"]
    u: Float[Array, " n"]
    v: Float[Array, " m"]
    f: Float[Array, " n"]
    g: Float[Array, " m"]
    col: Float[Array, " m"]
    marginal_error: Float[Array, ""]

    @property
    def plan_t(self) -> Float[Array, "m n"]:
        """`T^T [m, n]`."""
        return self.v[:, None] * self.kernel_t * self.u[None, :]


def _marginal_error(row, col, a, b) -> Float[Array, ""]:
    """`max(|row - a| / a, |col - b| / b)` over the used entries (`a, b > 0`)."""
    row_err = jnp.max(jnp.abs(row - a) / jnp.where(a > 0, a, 1.0))
    col_err = jnp.max(jnp.abs(col - b) / jnp.where(b > 0, b, 1.0))
    return jnp.maximum(row_err, col_err)


def _log_iteration_t(cost_t, eps, a, b, f):
    """One log-domain Sinkhorn iteration, `g` then `f` (ott's order), on `C^T [m, n]`.

    The `f` update and the plan share one `exp` pass: with
    `z = (g - C) / eps`, `f = eps (log a - lse_j z)` and the plan
    `exp((f + g - C) / eps) = a * softmax_j(z)`.

    Returns:
      `(plan_t, f, g)`; the plan's prototype marginal is `a`, and a
      zero-mass prototype (`a = 0`) has a zero column and `f = -inf`.
    """
    g = eps * jnp.log(b) - eps * jax.nn.logsumexp((f[None, :] - cost_t) / eps, axis=1)
    z = (g[:, None] - cost_t) / eps
    z_max = jax.lax.stop_gradient(jnp.max(z, axis=0, keepdims=True))
    e = jnp.exp(z - z_max)
    total = jnp.sum(e, axis=0, keepdims=True)
    plan_t = (a[None, :] / total) * e
    f = eps * (jnp.log(a) - (z_max + jnp.log(total))[0])
    return plan_t, f, g


def _scalings(kernel_t, a, b, length: int):
    """`length` kernel-mode iterations from `u = v = 1`: `(u, v, K^T v)`.

    Denominators are clamped at the smallest normal number, so a column
    whose kernel entries all underflowed gets a large finite scaling (the
    next block's `exp` recomputes it) instead of an infinite one (which ott
    maps to a zero scaling, silently dropping the column). The last `K^T v`
    is returned for the prototype-side marginal `u * K^T v`.
    """
    tiny = jnp.finfo(kernel_t.dtype).tiny

    def body(_, carry):
        u, v, _ = carry
        v = b / jnp.maximum(kernel_t @ u, tiny)
        kv = v @ kernel_t  # not kernel_t.T @ v: no transpose per iteration
        return a / jnp.maximum(kv, tiny), v, kv

    if length == 0:
        return jnp.ones_like(a), jnp.ones_like(b), jnp.ones_like(b) @ kernel_t
    return jax.lax.fori_loop(0, length, body, (jnp.ones_like(a), jnp.ones_like(b), a))


def _absorbed_t(cost_t, epsilon, a, b, f, num_iters: int) -> TransposedPlan:
    """The absorbed mode (`sinkhorn_plan`) on `C^T [m, n]`, its last block kept scaled.

    One log-domain iteration from `f` (its plan is the first block's kernel,
    every entry at most 1), then `num_iters - 1` kernel-mode iterations in
    blocks of at most `ABSORB_EVERY`; after each block but the last the
    scalings are absorbed into the potentials (`f += eps log u`) and the next
    kernel is `exp((f + g - C) / eps)`. The last block's plan is
    `diag(v) K diag(u)`, equal to the `exp` of its absorbed potentials in
    exact arithmetic: one `exp` pass per E-step fewer than recomputing it.
    """
    kernel, f, g = _log_iteration_t(cost_t, epsilon, a, b, f)
    rest = num_iters - 1
    first = min(rest, ABSORB_EVERY)
    u, v, kv = _scalings(kernel, a, b, first)
    rest -= first
    if rest:
        # Full blocks, absorbed; the last block (1 to ABSORB_EVERY) is kept scaled.
        full, last = divmod(rest - 1, ABSORB_EVERY)
        last += 1

        def absorb(f, g, u, v):
            return f + epsilon * jnp.log(u), g + epsilon * jnp.log(v)

        def kernel_of(f, g):
            return jnp.exp((f[None, :] + g[:, None] - cost_t) / epsilon)

        def block(_, fg):
            u, v, _ = _scalings(kernel_of(*fg), a, b, ABSORB_EVERY)
            return absorb(*fg, u, v)

        f, g = jax.lax.fori_loop(0, full, block, absorb(f, g, u, v))
        kernel = kernel_of(f, g)
        u, v, kv = _scalings(kernel, a, b, last)
    col = v * (kernel @ u)
    row = u * kv
    # a = 0 (empty ring-buffer slot): u = 0 and f stays -inf.
    f, g = f + epsilon * jnp.log(u), g + epsilon * jnp.log(v)
    return TransposedPlan(kernel, u, v, f, g, col, _marginal_error(row, col, a, b))


def sinkhorn_t(
    cost_t: Float[Array, "m n"],
    epsilon: float | Float[Array, ""],
    num_iters: int,
    a: Float[Array, " n"],
    f_init: Float[Array, " n"] | None = None,
    b: Float[Array, " m"] | None = None,
) -> TransposedPlan:
    """The absorbed-mode E-step in the refinement's layout (`C^T [m, n]`).

    Same iterations as `sinkhorn_plan(C, ..., mode="absorbed")` (the `g`
    update reads only `f`, so only `f` warm-starts), without the final
    `exp` pass and the transposes. No gradient flows through it.

    Args:
      cost_t: `[m, n]` transposed cost, `cost_t[j, i] = d(M_i, R_j)`.
      epsilon: absolute entropic regularisation.
      num_iters: Sinkhorn iterations (static, >= 1).
      a: `[n]` prototype marginal.
      f_init: `[n]` prototype potential to start from; None: 0 on used
        prototypes, -inf on zero-mass ones.
      b: `[m]` refined-side marginal; uniform when None.
    """
    cost_t = jax.lax.stop_gradient(cost_t)
    m = cost_t.shape[0]
    b = jnp.full((m,), 1.0 / m, cost_t.dtype) if b is None else b
    f = jnp.where(a > 0, 0.0, -jnp.inf).astype(cost_t.dtype) if f_init is None else f_init
    return _absorbed_t(cost_t, epsilon, a, b, f, num_iters)


def _solver(lse_mode: bool, num_iters: int) -> sinkhorn.Sinkhorn:
    return sinkhorn.Sinkhorn(
        lse_mode=lse_mode,
        min_iterations=num_iters,
        max_iterations=num_iters,
        # The error is evaluated once, after the last iteration.
        inner_iterations=num_iters,
        implicit_diff=None,
    )


def sinkhorn_plan(
    cost: Float[Array, "n m"],
    epsilon: float | Float[Array, ""],
    num_iters: int,
    a: Float[Array, " n"] | None = None,
    b: Float[Array, " m"] | None = None,
    init: tuple[Float[Array, " n"], Float[Array, " m"]] | None = None,
    mode: str = "log",
) -> TransportResult:
    """Entropic OT plan for `cost` with `num_iters` fixed Sinkhorn iterations.

    No gradient flows through the solver: the M-step holds `T` fixed
    (docs/method.md, "Objective"), so `cost` is passed through `stop_gradient`.

    Args:
      cost: `[n, m]` cost matrix `C[i, j] = d(M_i, R_j)`.
      epsilon: absolute entropic regularisation (callers scale it by the
        mean cost: docs/method.md, "Sinkhorn (E-step)").
      num_iters: Sinkhorn iterations (static).
      a: `[n]` source marginal; uniform when None.
      b: `[m]` target marginal; uniform when None.
      init: dual potentials `(f, g)` to start from (warm start), or None.
      mode: `"log"`: every iteration in ott's log domain (two log-sum-exps,
        i.e. two `exp` passes over the `[n, m]` cost). `"absorbed"`: one
        log-domain iteration from `init` (its plan is the first block's
        kernel), then `num_iters - 1` kernel-mode
        iterations (two matrix-vector products each) in blocks of
        `ABSORB_EVERY`, the scalings absorbed into the potentials after each
        block and the kernel recomputed from them (one `exp` pass per block;
        log-domain stabilisation by absorption, Schmitzer 2019); the plan is
        the last block's scaled kernel `diag(u) K diag(v)` (`sinkhorn_t`,
        which the refinement calls in its own layout). Clamped
        denominators keep every scaling finite; at every epsilon the config
        accepts (>= 1e-3 of the mean cost) the plan agrees with log mode's
        to the tolerances of `tests/test_transport.py`.

    Returns:
      The plan, the potentials and the marginal error.
    """
    cost = jax.lax.stop_gradient(cost)
    n, m = cost.shape
    a = jnp.full((n,), 1.0 / n, cost.dtype) if a is None else a
    b = jnp.full((m,), 1.0 / m, cost.dtype) if b is None else b
    if mode not in ("log", "absorbed"):
        raise ValueError(f"unknown Sinkhorn mode {mode!r}; use 'log' or 'absorbed'.")
    if mode == "log":
        problem = linear_problem.LinearProblem(
            geometry.Geometry(cost_matrix=cost, epsilon=epsilon), a=a, b=b
        )
        out = _solver(True, num_iters)(problem, init=init)
        plan, f, g = out.matrix, out.f, out.g
    else:
        # The g update reads only f (Gauss-Seidel), so only init's f matters.
        out = sinkhorn_t(cost.T, epsilon, num_iters, a, None if init is None else init[0], b)
        return TransportResult(out.plan_t.T, out.f, out.g, out.marginal_error)
    return TransportResult(plan, f, g, _marginal_error(plan.sum(1), plan.sum(0), a, b))
