"""Measurement machinery of `experiments.bench`: compile, time, count, tabulate.

A `Case` is one function and its (device-resident) arguments. `measure`
compiles each case from a cold cache (trace + lower and compile timed
separately), then times all cases interleaved round-robin (`time_calls`) and
returns one row per case: median / min / max seconds, per-image figures, the
loop-aware FLOP count of the jaxpr (`jaxpr_flops`) next to XLA's
`cost_analysis()`, the compiled scratch memory and the device's peak memory.
Nothing here knows the benchmark's sections or settings.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
from jax.extend import core as jex_core

# --------------------------------------------------------------------------- FLOPs

_TRANSCENDENTAL = {
    "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "erf", "erfc", "erf_inv",
    "sin", "cos", "tan", "atan2", "pow", "sqrt", "rsqrt", "cbrt",
}  # fmt: skip
_ELEMENTWISE = {
    "add", "add_any", "sub", "mul", "div", "max", "min", "neg", "abs", "sign", "rem",
    "integer_pow", "square", "select_n", "eq", "ne", "lt", "le", "gt", "ge", "and", "or",
    "not", "xor", "floor", "ceil", "round", "clamp", "is_finite", "nextafter",
}  # fmt: skip
_REDUCTIONS = {
    "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
    "argmax", "argmin", "cumsum", "cummax", "cummin", "cumprod", "cumlogsumexp",
}  # fmt: skip


def _size(aval: Any) -> int:
    return int(math.prod(getattr(aval, "shape", ())))


def jaxpr_flops(jaxpr: jex_core.Jaxpr) -> tuple[float, float]:
    """`(flops, transcendentals)` of a jaxpr, loop bodies times their trip count.

    Counts as XLA's cost analysis does (dot: `2 * M * N * K`; convolution:
    `2 * out * K_spatial * C_in / groups`; elementwise and reductions: one per
    element; exp/log/sqrt/... as transcendentals), but multiplies each `scan`
    body by its `length`. Padded convolutions count their zero taps too (XLA
    skips them: a few % more on small feature maps). A `while` body counts
    once (unknown trip count); a `cond` counts its cheapest branch (ott
    computes its marginal error in a branch taken once per solve).

    Args:
      jaxpr: e.g. `jax.jit(f).trace(*args).jaxpr.jaxpr`.

    Returns:
      Floating-point operations and transcendental evaluations.
    """
    flops = trans = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        ins = [v.aval for v in eqn.invars]
        out = sum(_size(v.aval) for v in eqn.outvars)
        if name == "dot_general":
            (_, rc), (_, rb) = eqn.params["dimension_numbers"]
            free = math.prod(d for i, d in enumerate(ins[1].shape) if i not in rc and i not in rb)
            flops += 2.0 * _size(ins[0]) * free
        elif name == "conv_general_dilated":
            out_features = ins[1].shape[eqn.params["dimension_numbers"].rhs_spec[0]]
            flops += 2.0 * out * _size(ins[1]) / out_features
        elif name == "cholesky":
            n = ins[0].shape[-1]
            flops += _size(ins[0]) * n / 3.0
        elif name == "triangular_solve":
            flops += float(_size(ins[1]) * ins[0].shape[-1])
        elif name in _TRANSCENDENTAL:
            trans += out
        elif name in _ELEMENTWISE:
            flops += out
        elif name in _REDUCTIONS:
            flops += _size(ins[0])
        elif name.startswith("reduce_window"):
            flops += out * math.prod(eqn.params["window_dimensions"])
        subs = [
            q.jaxpr if isinstance(q, jex_core.ClosedJaxpr) else q
            for p in eqn.params.values()
            for q in (p if isinstance(p, tuple | list) else (p,))
            if isinstance(q, jex_core.ClosedJaxpr | jex_core.Jaxpr)
        ]
        counts = [jaxpr_flops(sub) for sub in subs]
        if name == "cond" and counts:
            counts = [min(counts)]
        times = eqn.params["length"] if name == "scan" else 1
        flops += times * sum(c[0] for c in counts)
        trans += times * sum(c[1] for c in counts)
    return flops, trans


# --------------------------------------------------------------------------- timing


class Case(NamedTuple):
    """One function to time.

    Attributes:
      section: benchmark section (`extract`, `refine`, ...).
      case: what is measured (backbone, shape).
      method: `extract`, or the base / refined method name.
      batch: images (queries) per call.
      fn: the function; jitted here.
      args: its arguments (already on the device).
      info: extra fields for the row (shapes, devices).
    """

    section: str
    case: str
    method: str
    batch: int
    fn: Callable[..., Any]
    args: tuple
    info: dict[str, Any] = {}


def peak_mb() -> float | None:
    """The first device's `peak_bytes_in_use` in MiB (None where not reported, e.g. CPU)."""
    stats = jax.devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return round(stats["peak_bytes_in_use"] / 2**20, 1)


def compile_case(case: Case) -> tuple[Any, dict[str, Any]]:
    """Compiles `case.fn` from a cold cache; returns it and lower/compile/cost fields."""
    jax.clear_caches()
    t0 = time.perf_counter()
    traced = jax.jit(case.fn).trace(*case.args)
    lowered = traced.lower()
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    flops, trans = jaxpr_flops(traced.jaxpr.jaxpr)
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list | tuple) else cost) or {}
    try:
        temp_mb = round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1)
    except (AttributeError, NotImplementedError):  # backends without memory analysis
        temp_mb = None
    return compiled, {
        "lower_s": round(t1 - t0, 3),
        "compile_s": round(t2 - t1, 3),
        "gflop": flops / 1e9,
        "gtranscendental": trans / 1e9,
        "xla_gflop": float(cost.get("flops", float("nan"))) / 1e9,
        "temp_mb": temp_mb,
    }


def time_calls(calls: Sequence[Callable[[], Any]], repeats: int, warmup: int) -> list[list[float]]:
    """Seconds per call of each thunk, interleaved round-robin after warm-up.

    Args:
      calls: thunks returning arrays.
      repeats: timed rounds.
      warmup: untimed rounds first.

    Returns:
      One list of `repeats` durations per thunk.
    """
    for _ in range(warmup):
        for call in calls:
            jax.block_until_ready(call())
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for i, call in enumerate(calls):
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[i].append(time.perf_counter() - start)
    return times


def timing_stats(times: list[float], batch: int, gflop: float) -> dict[str, Any]:
    """Median / min / max seconds, spread and per-image figures of one call's `times`."""
    med = statistics.median(times)
    return {
        "median_s": med,
        "min_s": min(times),
        "max_s": max(times),
        "spread_pct": round(100.0 * (max(times) - min(times)) / med, 1),
        "ms_per_image": 1e3 * med / batch,
        "images_per_s": batch / med,
        "tflop_per_s": gflop / med / 1e3,
    }


def measure(cases: Sequence[Case], repeats: int, warmup: int) -> list[dict[str, Any]]:
    """Compiles every case, times them interleaved; one row per case (printed as it comes)."""
    compiled, fields = zip(*(compile_case(c) for c in cases), strict=True)
    calls = [lambda f=f, c=c: f(*c.args) for f, c in zip(compiled, cases, strict=True)]
    times = time_calls(calls, repeats, warmup)
    rows = []
    for case, info, ts in zip(cases, fields, times, strict=True):
        row = {"section": case.section, "case": case.case, "method": case.method}
        stats = timing_stats(ts, case.batch, info["gflop"])
        row.update(batch=case.batch, **case.info, **info, **stats)
        row.update(gflop_per_image=info["gflop"] / case.batch, peak_mb=peak_mb(), times_s=ts)
        row["xla_gflop_per_image"] = info["xla_gflop"] / case.batch
        rows.append(row)
        print(progress(row), flush=True)
    return rows


def measure_api(
    compiled_row: dict[str, Any], fn: Callable, args: tuple, repeats: int, warmup: int
) -> dict[str, Any]:
    """Times the plain API call `fn(*args)` (its input checks and dispatch included).

    `refine_and_score` checks shapes and finiteness before its jitted core; the
    compiled rows time the core alone, this row what a direct caller pays.

    Args:
      compiled_row: the row of the same computation timed compiled.
      fn: the API function.
      args: its arguments.
      repeats: timed calls.
      warmup: untimed calls first (at least one: the first call compiles).

    Returns:
      A row with method `<method> (API call)` and the overhead over the
      compiled row in percent.
    """
    (ts,) = time_calls([lambda: fn(*args)], repeats, max(warmup, 1))
    row = {k: compiled_row[k] for k in ("section", "case", "batch", "shape") if k in compiled_row}
    row["method"] = f"{compiled_row['method']} (API call)"
    row.update(timing_stats(ts, row["batch"], compiled_row["gflop"]), times_s=ts)
    row["gflop_per_image"] = compiled_row["gflop_per_image"]
    row["overhead_pct"] = 100.0 * (row["median_s"] / compiled_row["median_s"] - 1.0)
    print(progress(row), flush=True)
    return row


def progress(row: dict[str, Any]) -> str:
    """One progress line of a timed row."""
    return (
        f"[{row['section']}] {row['case']} {row['method']} B={row['batch']}: "
        f"{row['ms_per_image']:.2f} ms/img, {row['images_per_s']:.1f} img/s "
        f"(lower {row.get('lower_s', 0):.1f} s, compile {row.get('compile_s', 0):.1f} s, "
        f"spread {row['spread_pct']}%)"
    )


# --------------------------------------------------------------------------- tables


def fmt(x: Any, digits: int = 3) -> str:
    """A table cell: `-` for None, 3 significant digits, thousands separators from 1000."""
    if x is None:
        return "-"
    if isinstance(x, bool | str | int):
        return str(x)
    if x != x:  # nan
        return "nan"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def columns(spec: str) -> list[tuple[str, str]]:
    """`"header=key, ..."` -> `[(header, key), ...]`."""
    return [tuple(part.split("=")) for part in spec.split(", ")]


def table(cols: Sequence[tuple[str, str]], rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of `rows` with `(header, key)` columns (missing keys: `-`)."""
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for _, k in cols) + " |" for r in rows]
    return "\n".join(lines)
