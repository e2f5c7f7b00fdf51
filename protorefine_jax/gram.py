"""Gram-space linear algebra shared by the refinement, the scoring and WinCLIP+.

With `G = M M^T [n, n]` and `P = F M^T [m, n]` every quantity the method needs
is an inner product of rows of `F`, `M` and `R = W M`, so nothing downstream of
`gram_system` touches the feature axis `c` (see `refine`'s module docstring).

Numerics (RESULTS.md, "Numerical fixes"):

- Scale. Squared-Euclidean features are multiplied by a power of two `s`
  (exact in binary floating point) so that their largest entry lies in
  `[0.5, 1)`; every product is then free of overflow and underflow, and the
  squared distances are scaled back by `1 / s^2` (`GramSystem.scale_sq`) at
  the end. Cosine rows are normalised after the same per-row rescaling, so the
  cosine distance is exactly scale-invariant. The squared-Euclidean scores
  themselves must be representable: `checks.feature_range` states the range.
- Units. The bank's products (`G`, its Cholesky factor) are formed in the
  bank's OWN power-of-two units (`bank_gram`, `chol`) and brought to the
  query's by the exact factor `2^(2 shift)`: they then depend on the bank
  alone, so under `vmap` over queries XLA computes them once and every
  product with `G` is one GEMM for the whole batch (a batched `[B, n, n]`
  Gram would make `G W^T` the largest cost of the EM loop; docs/method.md,
  "Batching"). Powers of two scale exactly, so the numbers are those of the
  joint scaling, with one difference: the ridge's `trace(G) / n` is taken in
  the bank's units, so its `1e-12` floor does not bind when the queries are
  >= 1e6 x the bank (in the joint units it would: the ridge would become
  absolute and move the scores by 30-70 %).
- Solves. The ridge system `G + delta I` is factorised once (Cholesky) and
  every solve is a pair of triangular solves, not a product with an explicit
  inverse: at ridge 1e-4 (4 shots) the inverse's rounding is not orthogonal
  to the bank and inflates float32 W-only patch scores by a median 1.15x
  over float64 (up to 2.3x), the solve's by 1.00x (RESULTS.md, "Numerical
  fixes").
- dtype. `precision="float64"` runs everything in float64; it needs
  `jax.config.update("jax_enable_x64", True)` before the config is built.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
from jaxtyping import Array, Float

from protorefine_jax.bank import uses_wide_ridge
from protorefine_jax.config import RefineConfig

_EPS = 1e-12


class GramSystem(NamedTuple):
    """Inner products of one query with the bank (in rescaled units, see module docstring).

    Attributes:
      gram: `[n, n]` `G = M M^T`.
      cross: `[m, n]` `P = F M^T`.
      f_sq: `[m]` squared norms of the query patches.
      m_sq: `[n]` squared norms of the prototypes (`diag(G)`).
      chol: lower Cholesky factor of `bank_gram + delta 2^(-2 shift) I`
        (`[n, n]`, the bank's units), used by every solve against the Gram
        matrix (`ridge_solve`). None when not needed (host scoring).
      delta: the absolute ridge `delta`.
      weights: `[n]` prototype marginal `a` of the transport (uniform `1/n`;
        zero marks an empty slot of the online ring buffer, which then takes
        part in nothing).
      scale_sq: factor turning the squared distances of this system into the
        caller's units (`1 / s^2` of the power-of-two rescaling; 1 for cosine).
      bank_gram: `[n, n]` the same Gram matrix in the bank's own units:
        `gram = bank_gram * 2^(2 shift)` exactly (module docstring, "Units").
      shift: int32 power-of-two offset of the query's units from the bank's
        (0 for the cosine distance).
      bank_rows: `[n, c]` the rescaled prototypes in the bank's units, set
        only in the feature form (`uses_feature_form`); there `gram`,
        `bank_gram` and `chol` are None and every product with `G` is formed
        as `(W M) M^T` (`bank_gram_times`).
      query_rows: `[m, c]` the rescaled query patches in the query's units
        (feature form only).
      feature_chol: lower Cholesky factor of `M^T M + delta I` (`[c, c]`,
        bank units; feature form with `with_inverse` only), the factor of
        every solve there (`ridge_solution`).

    The two forms hold the same numbers in exact arithmetic; they round
    differently (`tests/test_feature_form.py` states by how much).
    """

    gram: Float[Array, "n n"]
    cross: Float[Array, "m n"]
    f_sq: Float[Array, " m"]
    m_sq: Float[Array, " n"]
    chol: Float[Array, "n n"] | None
    delta: Float[Array, ""]
    weights: Float[Array, " n"]
    scale_sq: Float[Array, ""]
    bank_gram: Float[Array, "n n"] | None
    shift: Array
    bank_rows: Float[Array, "n c"] | None = None
    query_rows: Float[Array, "m c"] | None = None
    feature_chol: Float[Array, "c c"] | None = None

    @property
    def dtype(self):
        """The dtype of every product of the system."""
        return self.cross.dtype

    @property
    def feature_form(self) -> bool:
        """True when the bank enters through its rows (`uses_feature_form`), not `G`."""
        return self.bank_rows is not None


def compute_dtype(config: RefineConfig):
    """float64 for `precision="float64"`, else float32."""
    return jnp.float64 if config.precision == "float64" else jnp.float32


# Parts `times_pow2` splits an exponent into: five parts of at most 126
# (float32) cover the widest exponent it is given, `2 shift` of two scalings
# at opposite ends of float32's range (|2 shift| <= 2 * 277).
_POW2_PARTS = 5


def times_pow2(x: Float[Array, "*shape"], k) -> Float[Array, "*shape"]:
    """`x * 2^k` for integer `k` (broadcast against `x`): `jnp.ldexp`'s numbers, cheaper.

    `jnp.ldexp` assembles its result from the bits in several elementwise
    passes (abs, isinf, select, power); on the 2-core CPU its calls took
    2.1 ms per query at batch 8 (`[1024, 152]` features, `[1024, 102]`
    products), ~10 % of PatchCore+'s refinement. Here `k` is
    split into `_POW2_PARTS` parts in the range of normal exponents, each
    part's power of two is built exactly (`ldexp` on the small exponent
    array only) and `x` is multiplied by them in turn: one fused pass. Multiplying by a power of
    two is exact unless the result leaves the normal range, so wherever the
    result is a normal number (and for 0, inf, NaN) it is bit-identical to
    `jnp.ldexp`; overflow gives inf as there. Subnormal results may differ in
    the last subnormal bit (`tests/test_gram.py`).
    """
    info = jnp.finfo(x.dtype)
    k = jnp.asarray(k, jnp.int32)
    one = jnp.ones((), x.dtype)
    for _ in range(_POW2_PARTS):
        part = jnp.clip(k, info.minexp, info.maxexp - 1)
        x = x * jnp.ldexp(one, part)
        k = k - part
    return x


def _pow2_exponent(amax):
    """`e` with `amax = mantissa * 2^e`, mantissa in `[0.5, 1)` (0 for `amax = 0`)."""
    return jnp.frexp(amax)[1]


def normalize_rows(x: Float[Array, "k c"]) -> Float[Array, "k c"]:
    """Unit-norm rows (zero rows stay zero), for any finite scale of each row.

    Each row is first multiplied by the power of two that brings its largest
    entry into `[0.5, 1)` (exact), so the norm neither overflows (rows near
    `3e38`) nor underflows (rows near `1e-30`).
    """
    e = _pow2_exponent(jnp.max(jnp.abs(x), axis=-1, keepdims=True))
    x = times_pow2(x, -e)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _EPS)


_PRECISIONS = {
    "float32": jax.lax.Precision.HIGHEST,
    "float64": jax.lax.Precision.HIGHEST,
    "tf32": jax.lax.Precision.DEFAULT,
}


def feature_products(x: Float[Array, "a c"], y: Float[Array, "b c"], precision: str):
    """`x @ y.T [a, b]` over the feature axis in the configured precision.

    These are the only products whose cost scales with `c`; everything after
    them works on `[n, n]` and `[m, n]` matrices.

    Args:
      x: `[a, c]` rows.
      y: `[b, c]` rows.
      precision: `"float32"` (full-precision passes), `"float64"`, `"tf32"`
        (the backend's default: TF32 tensor cores on NVIDIA GPUs, float32 on
        CPU) or `"bfloat16"` (inputs rounded to bfloat16, float32
        accumulation).

    Returns:
      `[a, b]` in the inputs' dtype (float32 for bfloat16).
    """
    if precision == "bfloat16":
        return jax.lax.dot_general(
            x.astype(jnp.bfloat16),
            y.astype(jnp.bfloat16),
            (((1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32,
        )
    return jnp.matmul(x, y.T, precision=_PRECISIONS[precision])


def matmul_precision(config: RefineConfig):
    """Context for every product of the refinement: full precision unless "tf32".

    JAX's default matmul precision on NVIDIA GPUs is TF32 (10-bit mantissa),
    which would silently degrade `W0` and the cancelling distance
    `||f||^2 + ||r||^2 - 2 <f, r>`. The feature products set their own
    precision (`feature_products`).
    """
    if config.precision == "tf32":
        return contextlib.nullcontext()
    return jax.default_matmul_precision("float32")


def ridge_in_force(config: RefineConfig, n: int, c: int):
    """The relative ridge for a bank spanned by `n` rows (static) and `c` features.

    `ridge_wide` when `n >= c`, else `ridge`. For the online bank `n` is the
    support bank's row count, not `n + K`: every ring-buffer row is a refined
    prototype `W M`, inside the span of the support rows, so the buffer never
    widens the span the rule is about (`MemoryBank.degenerate`). An online
    stream is thus scored under one ridge from its first query to its last,
    the ridge of the offline detector and of its calibration (RESULTS.md,
    "Calibrated PatchCore+", its "Online" part).
    """
    return config.ridge_wide if uses_wide_ridge(n, c) else config.ridge


def uses_feature_form(config: RefineConfig, n: int, c: int) -> bool:
    """Does a bank of `n` rows (static) and `c` features enter through its rows?

    `RefineConfig.products`: `"gram"` never, `"features"` always, `"auto"`
    when the closed-form M-step runs and `n > 2 c`. Every product with the
    Gram matrix is `W G`: `2 m n^2` flops through `G [n, n]`, `4 m n c` as
    `(W M) M^T`, so the rows are the cheaper road once `n > 2 c`, and they
    never form an `[n, n]` array (400 MB at n = 10,240). The optax M-step
    (its loss and gradients are written against `G`) keeps the Gram form.
    """
    if config.products == "gram" or config.m_step != "closed_form":
        return False
    return config.products == "features" or n > 2 * c


def gram_system(
    bank: Float[Array, "n c"],
    query: Float[Array, "m c"],
    config: RefineConfig,
    weights: Float[Array, " n"] | None = None,
    with_inverse: bool = True,
    span_rows: int | None = None,
) -> GramSystem:
    """Inner products and the ridge-regularised Gram factor for one query.

    The ridge `delta` follows docs/method.md, "The ridge rule".

    Args:
      bank: `[n, c]` prototypes `M` (rows of zero weight must be zero).
      query: `[m, c]` patch features `F`.
      config: distance (cosine normalises rows), relative ridge, precision.
      weights: `[n]` prototype marginal; uniform when None.
      with_inverse: factorise `G + delta I` (refinement needs it, host
        scoring does not).
      span_rows: static count of leading rows that span the bank (the
        online scan: the support bank; the ring-buffer rows after them are
        refined prototypes inside their span). The ridge is theirs: its
        regime by `ridge_in_force(span_rows, c)`, its scale by their mean
        squared norm, so it does not move as the buffer fills. None: every
        used row.

    Returns:
      The Gram system.
    """
    dtype = compute_dtype(config)
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError(
            'precision="float64" needs 64-bit JAX: call '
            'jax.config.update("jax_enable_x64", True) at startup (or set JAX_ENABLE_X64=1).'
        )
    bank, query = bank.astype(dtype), query.astype(dtype)
    if config.distance == "cosine":
        bank, query = normalize_rows(bank), normalize_rows(query)
        scale_sq = jnp.ones((), dtype)
        shift = jnp.zeros((), jnp.int32)
    else:
        # The joint exponent `e` (bank and query) sets the query's units; the
        # bank is scaled by its own `e_bank` (a function of the bank alone),
        # and its products are moved to the query's units by `2^shift`.
        e_bank = _pow2_exponent(jnp.max(jnp.abs(bank)))
        e = _pow2_exponent(jnp.maximum(jnp.max(jnp.abs(bank)), jnp.max(jnp.abs(query))))
        bank, query = times_pow2(bank, -e_bank), times_pow2(query, -e)
        scale_sq = times_pow2(jnp.ones((), dtype), 2 * e)
        shift = (e_bank - e).astype(jnp.int32)
    if config.precision == "bfloat16":
        # Round once, so the squared norms below and the products agree.
        bank = bank.astype(jnp.bfloat16).astype(dtype)
        query = query.astype(jnp.bfloat16).astype(dtype)
    n, c = bank.shape
    rows = uses_feature_form(config, n, c)
    # One product for a whole vmapped batch (the bank operand is unbatched).
    cross = times_pow2(feature_products(query, bank, config.precision), shift)  # [m, n]
    if rows:
        bank_gram = gram = None
        bank_m_sq = jnp.sum(bank * bank, axis=-1)
    else:
        bank_gram = feature_products(bank, bank, config.precision)  # [n, n], bank units
        gram = times_pow2(bank_gram, 2 * shift)
        bank_m_sq = jnp.diagonal(bank_gram)
    if weights is None:
        weights = jnp.full((n,), 1.0 / n, cross.dtype)
    weights = weights.astype(cross.dtype)
    # Ridge relative to the mean eigenvalue trace(G)/n over the used rows:
    # scale-free, and keeps a singular G (n > c, duplicates) invertible.
    if span_rows is None:
        used = jnp.maximum(jnp.sum(weights > 0), 1)
        rel = ridge_in_force(config, n, c)
        trace = jnp.sum(bank_m_sq) if rows else jnp.trace(bank_gram)
        bank_delta = rel * jnp.maximum(trace / used, _EPS)
    else:
        if not 1 <= span_rows <= n:
            raise ValueError(f"span_rows must lie in [1, n={n}], got {span_rows}.")
        rel = ridge_in_force(config, span_rows, c)
        bank_delta = rel * jnp.maximum(jnp.sum(bank_m_sq[:span_rows]) / span_rows, _EPS)
    chol = feature_chol = None
    if with_inverse and rows:
        # The push-through identity: (M M^T + d I)^-1 M = M (M^T M + d I)^-1.
        inner = jnp.matmul(bank.T, bank, precision=jax.lax.Precision.HIGHEST)
        feature_chol = jnp.linalg.cholesky(inner + bank_delta * jnp.eye(c, dtype=cross.dtype))
    elif with_inverse:
        chol = jnp.linalg.cholesky(bank_gram + bank_delta * jnp.eye(n, dtype=cross.dtype))
    f_sq = jnp.sum(query * query, axis=-1)
    m_sq, delta = times_pow2(bank_m_sq, 2 * shift), times_pow2(bank_delta, 2 * shift)
    extra = (bank, query, feature_chol) if rows else (None, None, None)
    return GramSystem(
        gram, cross, f_sq, m_sq, chol, delta, weights, scale_sq, bank_gram, shift, *extra
    )


def in_bank_units(sys: GramSystem) -> GramSystem:
    """The system's Gram side in the bank's own units (`gram = bank_gram`).

    Costs between prototypes and refined prototypes `R = W M` then come out
    multiplied by the exact factor `2^(-2 shift)`; the E-step's plan, whose
    epsilon is relative to the mean cost, is the same. Under `vmap` the Gram
    matrix stays unbatched (module docstring, "Units"). Only the Gram side
    (`gram`, `m_sq`, `delta`) moves; `cross` and `f_sq` stay in query units.
    """
    if sys.feature_form:  # the rows are in the bank's units already
        m_sq = times_pow2(sys.m_sq, -2 * sys.shift)
    else:
        m_sq = jnp.diagonal(sys.bank_gram)
    return sys._replace(
        gram=sys.bank_gram,
        m_sq=m_sq,
        delta=times_pow2(sys.delta, -2 * sys.shift),
        shift=jnp.zeros_like(sys.shift),
    )


def bank_gram_times(sys: GramSystem, w: Float[Array, "k n"]) -> Float[Array, "k n"]:
    """`W G_bank [k, n]` (the bank's units): one GEMM with `bank_gram`, or `(W M) M^T`."""
    if sys.feature_form:
        return (w @ sys.bank_rows) @ sys.bank_rows.T
    return w @ sys.bank_gram


def gram_times(sys: GramSystem, w: Float[Array, "k n"]) -> Float[Array, "k n"]:
    """`W G [k, n]` in the system's units (`w @ sys.gram` in the Gram form)."""
    if sys.feature_form:
        return times_pow2(bank_gram_times(sys, w), 2 * sys.shift)
    return w @ sys.gram


def refined_rows(sys: GramSystem, w: Float[Array, "m n"]) -> Float[Array, "m c"]:
    """The refined prototypes `R = W M [m, c]` in the query's units (feature form only)."""
    return times_pow2(w @ sys.bank_rows, sys.shift)


def ridge_solve(sys: GramSystem, rhs: Float[Array, "k n"]) -> Float[Array, "k n"]:
    """`rhs (G + delta I)^-1` by two triangular solves (no explicit inverse; Gram form).

    The factor is the bank's (`chol`, bank units): `(G + delta I)^-1 =
    2^(-2 shift) (G_bank + delta_bank I)^-1`, exactly. The feature form
    solves only the ridge regression itself (`ridge_solution`).
    """
    if sys.chol is None:
        raise ValueError(
            "ridge_solve needs the Gram factor: build the system with with_inverse=True "
            'and RefineConfig(products="gram") for solves other than ridge_solution.'
        )
    return times_pow2(jsl.cho_solve((sys.chol, True), rhs.T).T, -2 * sys.shift)


def ridge_solution(sys: GramSystem) -> Float[Array, "m n"]:
    """`W0 = P (G + delta I)^-1`, the ridge regression of the query on the bank.

    Gram form: `ridge_solve(sys, P)`. Feature form, by the push-through
    identity: `W0 = F (M^T M + delta I)^-1 M^T`, with `M = 2^shift M_bank`
    `= 2^(-shift) F (M_bank^T M_bank + delta_bank I)^-1 M_bank^T`: a
    `[c, c]` factor and two `m n c` products instead of an `[n, n]` factor.
    """
    if not sys.feature_form:
        return ridge_solve(sys, sys.cross)
    if sys.feature_chol is None:
        raise ValueError("ridge_solution needs the system built with with_inverse=True.")
    coef = jsl.cho_solve((sys.feature_chol, True), sys.query_rows.T).T  # [m, c]
    return times_pow2(coef @ sys.bank_rows.T, -sys.shift)


def refined_sq_norms(sys: GramSystem, w: Float[Array, "m n"]) -> Float[Array, " m"]:
    """`||R_j||^2 = (W G W^T)_jj` for every refined prototype (one GEMM with `bank_gram`)."""
    return times_pow2(jnp.sum(bank_gram_times(sys, w) * w, axis=-1), 2 * sys.shift)
