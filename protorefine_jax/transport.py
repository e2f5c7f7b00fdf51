"""E-step: entropic optimal transport between prototypes and refined prototypes.

The plan `T [n, m]` couples the original prototypes `M` (marginal `a`,
uniform `1/n`) with the refined prototypes `R = W M` (marginal `b`, uniform
`1/m`), paper Eq. 4-5. Solved by ott-jax's Sinkhorn with a
fixed iteration count (`min_iterations == max_iterations`: ott then runs a
`scan`, so vmapped queries do not wait on each other's convergence), either
entirely in the log domain or, by default, stabilised by absorption
(`sinkhorn_plan`'s `mode`).
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


@jax.tree_util.register_pytree_node_class
class _AbsorbedKernel(geometry.Geometry):
    """A geometry given by its kernel, applied as is.

    ott's `Geometry.apply_kernel` raises the kernel to the power
    `epsilon / eps` on every application (for epsilon schedules); with a
    fixed epsilon that power is 1 but still costs a `pow` over `[n, m]` per
    iteration, more than the matrix-vector product itself.
    """

    def apply_kernel(self, vec, eps=None, axis=0):  # noqa: D102
        del eps
        kernel = self._kernel_matrix
        return jnp.dot(kernel if axis == 1 else kernel.T, vec)


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
    (SPEC 3.2), so `cost` is passed through `stop_gradient`.

    Args:
      cost: `[n, m]` cost matrix `C[i, j] = d(M_i, R_j)`.
      epsilon: absolute entropic regularisation (callers scale it by the
        mean cost, SPEC 3.2).
      num_iters: Sinkhorn iterations (static).
      a: `[n]` source marginal; uniform when None.
      b: `[m]` target marginal; uniform when None.
      init: dual potentials `(f, g)` to start from (warm start), or None.
      mode: `"log"`: every iteration in ott's log domain (two log-sum-exps,
        i.e. two `exp` passes over the `[n, m]` cost). `"absorbed"`: one
        log-domain iteration from `init`, whose plan is then absorbed as the
        kernel of `num_iters - 1` ott iterations in kernel mode (two
        matrix-vector products each, no `exp`); the scalings go back into
        the potentials at the end (log-domain stabilisation by absorption,
        Schmitzer 2019). The absorbed kernel's rows sum exactly to `a`, so it
        has no zero row or column and nothing to overflow, whatever `C / eps`.

    Returns:
      The plan, the potentials and the marginal error.
    """
    cost = jax.lax.stop_gradient(cost)
    n, m = cost.shape
    a = jnp.full((n,), 1.0 / n, cost.dtype) if a is None else a
    b = jnp.full((m,), 1.0 / m, cost.dtype) if b is None else b
    if mode not in ("log", "absorbed"):
        raise ValueError(f"unknown Sinkhorn mode {mode!r}; use 'log' or 'absorbed'.")
    log_problem = linear_problem.LinearProblem(
        geometry.Geometry(cost_matrix=cost, epsilon=epsilon), a=a, b=b
    )
    log_iters = num_iters if mode == "log" else 1
    out = _solver(True, log_iters)(log_problem, init=init)
    plan, f, g = out.matrix, out.f, out.g
    if mode == "absorbed" and num_iters > 1:
        # After a log-domain step the rows of the plan sum exactly to `a`:
        # as a kernel it has no zero row or column and no entry above 1.
        kernel = plan
        problem = linear_problem.LinearProblem(
            _AbsorbedKernel(kernel_matrix=kernel, epsilon=epsilon), a=a, b=b
        )
        u, v = _solver(False, num_iters - 1)(problem).scalings
        plan = u[:, None] * kernel * v[None, :]
        f, g = f + epsilon * jnp.log(u), g + epsilon * jnp.log(v)
    row_err = jnp.max(jnp.abs(plan.sum(1) - a) / jnp.where(a > 0, a, 1.0))
    col_err = jnp.max(jnp.abs(plan.sum(0) - b) / jnp.where(b > 0, b, 1.0))
    return TransportResult(plan, f, g, jnp.maximum(row_err, col_err))
