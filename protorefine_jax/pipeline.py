"""The compiled entry points: `refine_and_score`, `detect`, the online scan.

`score_query` is written for ONE query; `score_batch` is the one place that
vmaps it over a batch (docs/method.md, "Batching"). Shape-setting settings are
static fields of `RefineConfig`, float hyper-parameters are traced, so a sweep
over `lam`, `epsilon`, `ridge` or `lr` reuses one compiled program.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from protorefine_jax import checks
from protorefine_jax.bank import MemoryBank, prototypes_of
from protorefine_jax.calibration import ScoreCalibration, fuse
from protorefine_jax.config import RefineConfig
from protorefine_jax.coreset import greedy_coreset_indices, projection_matrix
from protorefine_jax.gram import gram_system, matmul_precision, normalize_rows
from protorefine_jax.refine import refine
from protorefine_jax.scoring import anomaly_map, base_patch_scores, refined_patch_scores


class Diagnostics(NamedTuple):
    """Per-query numerical health of the refinement (zeros when it is off).

    Attributes:
      marginal_error: relative Sinkhorn marginal error of the last E-step.
      w_rel_change: relative change of W in the last EM iteration.
      lsq_residual: relative least-squares residual of `W0` (near 0: the bank
        reproduces the query exactly, the degenerate regime).
    """

    marginal_error: Float[Array, "*B"]
    w_rel_change: Float[Array, "*B"]
    lsq_residual: Float[Array, "*B"]


class RefineOutput(NamedTuple):
    """Scores of a batch of queries.

    Attributes:
      image_scores: `[B]` image anomaly scores (`max_j s_j`).
      maps: `[B, H, W]` anomaly maps (`[B, h, w]` grids when
        `config.image_size` is None).
      patch_scores: `[B, m]` patch scores `s_j`.
      diagnostics: per-query `Diagnostics`, each field `[B]`.
      inputs_ok: `[B]` bool, bank and query finite and inside
        `checks.feature_range` (computed on the device by `refine_and_score`
        and the online scan; None from `score_query`). A False entry's scores
        are meaningless; `checks.raise_if_invalid` raises the clear error.
    """

    image_scores: Float[Array, " B"]
    maps: Float[Array, "B H W"]
    patch_scores: Float[Array, "B m"]
    diagnostics: Diagnostics
    inputs_ok: Array | None = None


def _score(
    bank,
    query,
    config: RefineConfig,
    weights=None,
    calibration=None,
    host_weights=None,
    span_rows: int | None = None,
) -> tuple[RefineOutput, Array | None]:
    """`score_query` plus the refined transform `W` (None for host scoring).

    With a `calibration` (and `config.calibrated`), refined scores are fused
    with the host scores of the same Gram system (`calibration.fuse`); the
    host part scores against the rows of positive `host_weights` (default:
    the bank's used rows). `span_rows`: the leading rows whose ridge the
    refinement uses (`gram.gram_system`; the online scan's support bank).
    """
    with matmul_precision(config):
        system = gram_system(
            bank, query, config, weights, with_inverse=config.use_refinement, span_rows=span_rows
        )
        if config.use_refinement:
            ref = refine(system, config)
            scores = refined_patch_scores(system, ref.w, config, ref.refined_sq)
            if calibration is not None and config.calibrated:
                host_sys = system if host_weights is None else system._replace(weights=host_weights)
                scores = fuse(base_patch_scores(host_sys, config), scores, calibration)
            diag = Diagnostics(ref.marginal_error, ref.w_rel_change, ref.lsq_residual)
            w = ref.w
        else:
            zero = jnp.zeros((), system.dtype)
            scores = base_patch_scores(system, config)
            diag = Diagnostics(zero, zero, zero)
            w = None
        out = RefineOutput(jnp.max(scores), anomaly_map(scores, config), scores, diag)
    return out, w


def score_query(
    bank: MemoryBank | Float[Array, "n c"],
    query: Float[Array, "m c"],
    config: RefineConfig,
    calibration: ScoreCalibration | None = None,
) -> RefineOutput:
    """Refine the bank for one query and score it (paper Alg. 1; docs/method.md).

    Pure and unbatched: compose it with your own `jit`/`vmap`/`scan`.

    Args:
      bank: `[n, c]` prototypes `M`, or the `MemoryBank` holding them.
      query: `[m, c]` patch features `F`.
      config: refinement and scoring settings.
      calibration: support-set statistics (`calibration.calibrate`); with
        one, the refined patch scores are fused with the host's
        (`calibration.fuse`, the shipped PatchCore+). None: refined scores
        alone. Ignored by host scoring and when `config.calibrated` is False.

    Returns:
      `RefineOutput` with scalar image score, `[H, W]` map, `[m]` patch scores.
    """
    return _score(prototypes_of(bank), query, config, calibration=calibration)[0]


def score_batch(
    bank: MemoryBank | Float[Array, "n c"],
    queries: Float[Array, "B m c"],
    config: RefineConfig,
    calibration: ScoreCalibration | None = None,
) -> RefineOutput:
    """`score_query` over a batch of queries: the one `vmap` of the per-query function.

    Unjitted and unchecked, for composition (`refine_and_score`, `make_detect`).
    A batch of one runs `score_query` itself: XLA's CPU code for the vmapped
    program with a batch axis of size 1 took 2.5x the unbatched time
    (docs/method.md, "Batching").
    """
    bank = prototypes_of(bank)
    if queries.shape[0] == 1:
        out = score_query(bank, queries[0], config, calibration)
        return jax.tree.map(lambda x: x[None], out)
    return jax.vmap(score_query, in_axes=(None, 0, None, None))(bank, queries, config, calibration)


@jax.jit
def _refine_and_score_batch(bank, queries, config, calibration=None):
    out = score_batch(bank, queries, config, calibration)
    return out._replace(inputs_ok=checks.inputs_ok(bank, queries, config))


def refine_and_score(
    bank: MemoryBank | Float[Array, "n c"],
    queries: Float[Array, "B m c"],
    config: RefineConfig,
    calibration: ScoreCalibration | None = None,
    *,
    sync_check: bool = False,
) -> RefineOutput:
    """Batched, jitted `score_query` with input checks (docs/method.md, "Batching").

    Shapes and feature dimensions are checked before jit. Values (finite,
    inside `checks.feature_range`) are checked on the host for host inputs
    (numpy arrays); device arrays are not read back, their per-query flag is
    returned as `inputs_ok` (`sync_check=True` reads it and raises the same
    error, one `[B]` bool per call). Value checks are skipped when called under
    the caller's own transformation.
    Inputs sharded over devices on the batch axis (`NamedSharding`) run
    unchanged: the batch axis is embarrassingly parallel.

    Args:
      bank: `[n, c]` prototypes (e.g. `build_bank(...).prototypes`).
      queries: `[B, m, c]` patch features of the query images.
      config: refinement and scoring settings.
      calibration: support-set statistics for the calibrated PatchCore+
        (`score_query`); None scores with the refined prototypes alone.
      sync_check: read `inputs_ok` back and raise on bad values.

    Returns:
      `RefineOutput` with `[B]` image scores, `[B, H, W]` maps, `[B, m]` patch
      scores and `[B]` diagnostics.

    Example:
      >>> bank = build_bank(support_feats, alpha=0.05).prototypes
      >>> out = refine_and_score(bank, query_feats, RefineConfig(lam=0.3))
      >>> out.image_scores.shape, out.maps.shape
      ((16,), (16, 256, 256))
    """
    bank = prototypes_of(bank)
    checks.check_bank_and_queries(bank, queries, config)
    out = _refine_and_score_batch(bank, queries, config, calibration)
    if sync_check:
        checks.raise_if_invalid(out, bank, queries, config)
    return out


def make_detect(
    extract: Callable[[Any, Float[Array, "B H W 3"]], Float[Array, "B m c"]],
) -> Callable[..., RefineOutput]:
    """Compose a feature extractor with the refiner into one jitted `detect`.

    Args:
      extract: pure `extract(params, images) -> [B, m, c]`.

    Returns:
      `detect(params, bank, images, config, calibration=None) -> RefineOutput`
      (`bank` an array or a `MemoryBank`), jitted once; backbone, refinement
      and scoring compile into a single XLA program (`calibration` as in
      `score_query`).
    """

    @jax.jit
    def detect(params, bank, images, config: RefineConfig, calibration=None) -> RefineOutput:
        feats = extract(params, images)
        return score_batch(prototypes_of(bank), feats, config, calibration)

    return detect


class OnlineState(NamedTuple):
    """Carry of the online scan.

    Attributes:
      buffer: `[capacity, c]` ring buffer of prototypes taken from queries.
      valid: `[capacity]` which slots hold one yet.
      cursor: next slot to overwrite (the oldest).
    """

    buffer: Float[Array, "K c"]
    valid: Array
    cursor: Array


def _online_step(bank, config, add_per_query, projection, calibration, state: OnlineState, query):
    """Score one query against `M` plus the filled slots, then push its prototypes."""
    valid = jnp.concatenate([jnp.ones((bank.shape[0],), bool), state.valid])
    full = jnp.concatenate([bank, jnp.where(state.valid[:, None], state.buffer, 0.0)])
    weights = valid / jnp.sum(valid)  # empty slots get no transport mass
    # The host part of a calibrated score keeps to the support bank `M`: the
    # buffer holds refined query prototypes, anomalies included. The ridge is
    # `M`'s too (the buffer rows lie in its span): the refined part then runs
    # in the regime its calibration was measured in (RESULTS.md,
    # "Calibrated PatchCore+", its "Online" part).
    host = jnp.concatenate([jnp.ones((bank.shape[0],)), jnp.zeros((state.valid.shape[0],))])
    out, w = _score(
        full, query, config, weights, calibration, host.astype(weights.dtype), bank.shape[0]
    )
    with matmul_precision(config):
        # The query's refined prototypes R = W M [m, c], in the rows W was
        # solved against: unit rows for the cosine distance.
        rows = normalize_rows(full.astype(w.dtype)) if config.distance == "cosine" else full
        refined = w @ rows.astype(w.dtype)
        points = refined if projection is None else refined @ projection
        new = refined[greedy_coreset_indices(points, add_per_query, 0)]
    capacity = state.buffer.shape[0]
    slots = (state.cursor + jnp.arange(add_per_query)) % capacity
    buffer = state.buffer.at[slots].set(new)
    valid = state.valid.at[slots].set(True)
    return OnlineState(buffer, valid, (state.cursor + add_per_query) % capacity), out


@functools.partial(jax.jit, static_argnames=("capacity", "add_per_query"))
def _online_scan(bank, queries, config, capacity, add_per_query, calibration=None):
    n, c = bank.shape
    # Empty slots carry zero rows and zero transport weight, so the first
    # query sees exactly the offline bank; all shapes stay static.
    state = OnlineState(
        jnp.zeros((capacity, c), bank.dtype), jnp.zeros((capacity,), bool), jnp.zeros((), jnp.int32)
    )
    # The coreset of refined prototypes measures distances after the same
    # fixed projection as the bank's coreset (skipped for narrow features).
    projection = projection_matrix(c, 128, 0) if c > 128 else None
    step = functools.partial(_online_step, bank, config, add_per_query, projection, calibration)
    _, outs = jax.lax.scan(step, state, queries)
    return outs._replace(inputs_ok=checks.inputs_ok(bank, queries, config))


def online_refine_and_score(
    bank: Float[Array, "n c"],
    queries: Float[Array, "T m c"],
    config: RefineConfig,
    *,
    capacity: int,
    add_per_query: int,
    calibration: ScoreCalibration | None = None,
    sync_check: bool = False,
) -> RefineOutput:
    """Online PatchCore+/WinCLIP+ (paper Table 6; docs/method.md, "Batching") as a `lax.scan`.

    Queries are processed in stream order; each query's refined prototypes
    (a greedy coreset of `add_per_query` rows of `R = W M`) enter a ring
    buffer of `capacity` rows that joins the bank for the following queries.
    The bank size `n + capacity` is static. The buffer rows lie in the span
    of `bank`, so the ridge is `bank`'s (regime and scale, `gram.gram_system`
    `span_rows`): the same as `refine_and_score`'s and the calibration's, for
    every query of the stream. With a calibration the host half of the score
    is plain PatchCore's, against `bank` alone.

    Args:
      bank: `[n, c]` original prototypes (always kept).
      queries: `[T, m, c]` the query stream, in order.
      config: refinement settings (`use_refinement` must be True).
      capacity: ring-buffer rows `K`.
      add_per_query: prototypes pushed per query (`<= min(K, m)`).
      calibration: support-set statistics for calibrated scores (the host
        part scores against `bank` only); None: refined scores alone.
      sync_check: read the `inputs_ok` flag back and raise on bad values
        (as `refine_and_score`).

    Returns:
      `RefineOutput` with leading axis `T`, in stream order.
    """
    bank = prototypes_of(bank)
    checks.check_bank_and_queries(bank, queries, config)
    if not config.use_refinement:
        raise ValueError("the online variant refines by definition; set use_refinement=True.")
    m = queries.shape[1]
    if not 1 <= add_per_query <= min(capacity, m):
        raise ValueError(
            f"add_per_query must lie in [1, min(capacity, m)] = [1, {min(capacity, m)}], "
            f"got {add_per_query}."
        )
    out = _online_scan(bank, queries, config, capacity, add_per_query, calibration)
    if sync_check:
        checks.raise_if_invalid(out, bank, queries, config)
    return out
