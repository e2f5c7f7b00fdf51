"""E-step: entropic optimal transport between prototypes and refined prototypes.

The plan `T [n, m]` couples the original prototypes `M` (marginal `a`,
uniform `1/n`) with the refined prototypes `R = W M` (marginal `b`, uniform
`1/m`), paper Eq. 4-5. Solved by ott-jax's Sinkhorn in the log domain with a
fixed iteration count (`min_iterations == max_iterations`: ott then runs a
`scan`, so vmapped queries do not wait on each other's convergence).
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


def sinkhorn_plan(
    cost: Float[Array, "n m"],
    epsilon: float | Float[Array, ""],
    num_iters: int,
    a: Float[Array, " n"] | None = None,
    b: Float[Array, " m"] | None = None,
    init: tuple[Float[Array, " n"], Float[Array, " m"]] | None = None,
) -> TransportResult:
    """Entropic OT plan for `cost` with `num_iters` fixed log-domain iterations.

    No gradient flows through the solver: the M-step holds `T` fixed
    (SPEC 3.2), so `cost` is passed through `stop_gradient`.

    Args:
      cost: `[n, m]` cost matrix `C[i, j] = d(M_i, R_j)`.
      epsilon: absolute entropic regularisation (callers scale it by the
        mean cost, SPEC 3.2).
      num_iters: Sinkhorn iterations (static).
      a: `[n]` source marginal; uniform when None.
      b: `[m]` target marginal; uniform when None.
      init: dual potentials `(f, g)` to start from (warm start), or None.

    Returns:
      The plan, the potentials and the marginal error.
    """
    cost = jax.lax.stop_gradient(cost)
    n, m = cost.shape
    a = jnp.full((n,), 1.0 / n, cost.dtype) if a is None else a
    b = jnp.full((m,), 1.0 / m, cost.dtype) if b is None else b
    geom = geometry.Geometry(cost_matrix=cost, epsilon=epsilon)
    problem = linear_problem.LinearProblem(geom, a=a, b=b)
    solver = sinkhorn.Sinkhorn(
        lse_mode=True,
        min_iterations=num_iters,
        max_iterations=num_iters,
        # The error is evaluated once, after the last iteration.
        inner_iterations=num_iters,
        implicit_diff=None,
    )
    out = solver(problem, init=init)
    plan = out.matrix
    row_err = jnp.max(jnp.abs(plan.sum(1) - a) / jnp.where(a > 0, a, 1.0))
    col_err = jnp.max(jnp.abs(plan.sum(0) - b) / jnp.where(b > 0, b, 1.0))
    return TransportResult(plan, out.f, out.g, jnp.maximum(row_err, col_err))
