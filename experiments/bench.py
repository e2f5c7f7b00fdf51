r"""Speed of extraction, `refine_and_score` and end-to-end `detect`, base vs refined.

The paper's speed claim is its Table 3 (per image, RTX 3090): PatchCore
0.21 s, PatchCore+ 0.49 s (x2.33), WinCLIP 0.50 s, WinCLIP+ 0.81 s (x1.62).
This script measures the same pairs, batched and compiled, in ONE run so the
ratio refined / base is taken under the same conditions.

Launch (from the repository root):

  # CPU default: extract, refine, detect, profile; batch 1 and 8 (about
  # 5 minutes on 2 cores shared with other jobs). On CPU the script re-executes itself
  # with OPENBLAS_NUM_THREADS=1 (see `_environment_changes`).
  python -m experiments.bench --out=bench_cpu.json --markdown_out=bench_cpu.md
  # GPU default: the same plus WinCLIP(+) end to end; batch 1..256
  python -m experiments.bench --out=bench_gpu.json --markdown_out=bench_gpu.md
  # scaling over devices (on CPU: re-executes with N fake host devices)
  python -m experiments.bench --sections=sharding --devices=4 --out=bench_shard.json
  # scores and AUROC of RefineConfig.precision float32 / tf32 / bfloat16
  python -m experiments.bench --precision_check --out=bench_precision.json

Every timed entry: trace+lower (`jax.jit(f).trace(...).lower()`) and compile
(`.compile()`) after `jax.clear_caches()`, `--warmup` calls, then `--repeats`
calls with `block_until_ready`; base and refined calls are interleaved so a
change of machine load hits both. Inputs sit on the device before timing (no
host transfer), except the `run_sharded` rows, which include the placement,
and the `(API call)` row: `refine_and_score` as called, input checks included.

FLOPs: `xla_gflop` is XLA's `cost_analysis()`, which counts the body of a
loop ONCE (the EM `fori_loop` and the Sinkhorn `scan` run 10 and 30 times);
`gflop` walks the jaxpr and multiplies every `scan` body by its length
(within 0.3 % of `cost_analysis` on the loop-free backbones; a `cond`
counts its cheapest branch). Achieved TFLOP/s use `gflop`. Memory: `temp_mb` is the
compiled program's scratch (`memory_analysis()`, every backend); `peak_mb` is
the device's `peak_bytes_in_use` high-water mark so far (GPU; None on CPU).
Random weights throughout: the cost does not depend on their values.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import app, flags
from jax.extend import core as jex_core

from protorefine_jax import RefineConfig, build_bank, make_detect, refine_and_score
from protorefine_jax.features import get_extractor
from protorefine_jax.sharding import batch_mesh, replicate, run_sharded, shard_batch

PAPER_SECONDS_PER_IMAGE = {"patchcore": 0.21, "patchcore+": 0.49, "winclip": 0.50, "winclip+": 0.81}
"""Paper Table 3 (MVTec, RTX 3090), seconds per image."""

SECTIONS = ("extract", "refine", "detect", "winclip", "profile", "sharding", "precision")
_REEXEC_ENV = "PROTOREFINE_BENCH_REEXEC"


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """Everything a benchmark run needs; `main` fills it from flags.

    Empty tuples and None mean "the default for this backend" (`resolve`).
    """

    sections: tuple[str, ...] = ()
    batch_sizes: tuple[int, ...] = ()
    winclip_batch_sizes: tuple[int, ...] = ()
    repeats: int = 5
    warmup: int = 1
    backbones: tuple[str, ...] = ("efficientnet_lite0", "efficientnet_lite2", "wide_resnet50_2")
    detect_backbone: str = "wide_resnet50_2"
    aggregation: str = "official"
    extract_aggregations: tuple[str, ...] = ("official",)
    image_size: int = 256
    shots: int = 2
    alpha: float = 0.05
    pc_grid: int = 32
    pc_n: int = 102
    pc_c: int = 1024
    wc_grid: int = 15
    wc_c: int = 640
    wc_alpha: float = 0.5
    clip_model: str = "ViT-B-16-plus-240"
    precision: str = "float32"
    profile_batch: int | None = None
    devices: int | None = None
    sharding_batch: int | None = None
    precision_backbone: str = "efficientnet_lite0"
    precision_weights: str = ""
    precision_categories: tuple[str, ...] = ("fabric", "grain")
    precision_counts: tuple[int, int, int] = (10, 10, 10)
    precision_seed: int = 0


def resolve(s: BenchSettings) -> BenchSettings:
    """Fills backend-dependent defaults (sections and batch sizes).

    On CPU: no WinCLIP end to end (about 10 s per image), batches 1 and 8,
    profile batch 2; elsewhere every section but `precision`, batches 1 to
    256, WinCLIP batches 1 to 64, profile batch 64. `sharding` runs by
    default only with several devices (or `--devices`).
    """
    cpu = jax.default_backend() == "cpu"
    skip = {"precision"} | ({"winclip"} if cpu else set())
    if jax.device_count() == 1 and not s.devices:
        skip.add("sharding")  # one device: nothing to scale over
    sections = s.sections or tuple(x for x in SECTIONS if x not in skip)
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown sections {unknown}; choose from {list(SECTIONS)}.")
    batch_sizes = s.batch_sizes or ((1, 8) if cpu else (1, 8, 32, 64, 128, 256))
    winclip = s.winclip_batch_sizes or ((1,) if cpu else (1, 8, 32, 64))
    profile_batch = s.profile_batch or (2 if cpu else 64)
    if min((*batch_sizes, *winclip, profile_batch)) < 1 or s.repeats < 1 or s.warmup < 0:
        raise ValueError("batch sizes and --repeats must be >= 1, --warmup >= 0.")
    return dataclasses.replace(
        s,
        sections=tuple(sections),
        batch_sizes=batch_sizes,
        winclip_batch_sizes=winclip,
        profile_batch=profile_batch,
    )


# --------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    """Where and under which load the numbers were measured."""
    dev = jax.devices()[0]
    cpu_model = None
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu_model = names[0] if names else None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": getattr(dev, "device_kind", str(dev)),
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
    }


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


def _peak_mb() -> float | None:
    stats = jax.devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return round(stats["peak_bytes_in_use"] / 2**20, 1)


def _compile(case: Case) -> tuple[Any, dict[str, Any]]:
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


def _stats(times: list[float], batch: int, gflop: float) -> dict[str, Any]:
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


def measure(cases: Sequence[Case], s: BenchSettings) -> list[dict[str, Any]]:
    """Compiles every case, times them interleaved; one row per case."""
    compiled, fields = zip(*(_compile(c) for c in cases), strict=True)
    calls = [lambda f=f, c=c: f(*c.args) for f, c in zip(compiled, cases, strict=True)]
    times = time_calls(calls, s.repeats, s.warmup)
    rows = []
    for case, info, ts in zip(cases, fields, times, strict=True):
        row = {"section": case.section, "case": case.case, "method": case.method}
        row.update(batch=case.batch, **case.info, **info, **_stats(ts, case.batch, info["gflop"]))
        row.update(gflop_per_image=info["gflop"] / case.batch, peak_mb=_peak_mb(), times_s=ts)
        row["xla_gflop_per_image"] = info["xla_gflop"] / case.batch
        rows.append(row)
        print(_progress(row), flush=True)
    return rows


def measure_api(compiled_row: dict[str, Any], fn: Callable, args: tuple, s: BenchSettings):
    """Times the plain API call `fn(*args)` (its input checks and dispatch included).

    `refine_and_score` checks shapes and finiteness before its jitted core; the
    compiled rows time the core alone, this row what a direct caller pays.

    Args:
      compiled_row: the row of the same computation timed compiled.
      fn: the API function.
      args: its arguments.
      s: settings (repeats, warm-up).

    Returns:
      A row with method `<method> (API call)` and the overhead over the
      compiled row in percent.
    """
    (ts,) = time_calls([lambda: fn(*args)], s.repeats, max(s.warmup, 1))
    row = {k: compiled_row[k] for k in ("section", "case", "batch", "shape") if k in compiled_row}
    row["method"] = f"{compiled_row['method']} (API call)"
    row.update(_stats(ts, row["batch"], compiled_row["gflop"]), times_s=ts)
    row["gflop_per_image"] = compiled_row["gflop_per_image"]
    row["overhead_pct"] = 100.0 * (row["median_s"] / compiled_row["median_s"] - 1.0)
    print(_progress(row), flush=True)
    return row


def _progress(row: dict[str, Any]) -> str:
    return (
        f"[{row['section']}] {row['case']} {row['method']} B={row['batch']}: "
        f"{row['ms_per_image']:.2f} ms/img, {row['images_per_s']:.1f} img/s "
        f"(lower {row.get('lower_s', 0):.1f} s, compile {row.get('compile_s', 0):.1f} s, "
        f"spread {row['spread_pct']}%)"
    )


# --------------------------------------------------------------------------- inputs


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _images(batch: int, size: int, seed: int = 0) -> jax.Array:
    return jax.device_put(_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8))


def _features(*shape: int, seed: int = 0) -> jax.Array:
    # Post-ReLU-like positive features; the cost does not depend on the values.
    return jax.device_put(np.abs(_rng(seed).standard_normal(shape, np.float32)))


def patchcore_config(s: BenchSettings, grid: int, **fields: Any) -> RefineConfig:
    """PatchCore(+) config (shipped defaults: closed form, lam 0.3) at `grid`."""
    size = (s.image_size, s.image_size)
    return RefineConfig(grid_shape=(grid, grid), image_size=size, precision=s.precision, **fields)


def winclip_grids(grid: int) -> tuple[tuple[int, int], ...]:
    """Few-shot scales of WinCLIP+: patches, 2x2 and 3x3 windows (stride 1)."""
    return tuple((grid - w + 1, grid - w + 1) for w in (1, 2, 3))


def winclip_refine_configs(s: BenchSettings, **fields: Any) -> tuple[RefineConfig, ...]:
    """Per-scale WinCLIP(+) refinement configs (cosine, optax M-step, lam 0.1)."""
    return tuple(
        RefineConfig(
            distance="cosine",
            m_step="optax",
            lam=0.1,
            grid_shape=g,
            image_size=None,
            precision=s.precision,
            **fields,
        )
        for g in winclip_grids(s.wc_grid)
    )


def winclip_refine(banks, queries, configs):
    """`refine_and_score` over the three WinCLIP+ scales (one program)."""
    return tuple(refine_and_score(b, q, c) for b, q, c in zip(banks, queries, configs, strict=True))


def winclip_inputs(s: BenchSettings, batch: int) -> tuple[tuple, tuple]:
    """Random per-scale banks `[n_s, c]` and queries `[B, m_s, c]`."""
    banks, queries = [], []
    for i, (h, w) in enumerate(winclip_grids(s.wc_grid)):
        n = max(1, math.floor(s.wc_alpha * s.shots * h * w))
        banks.append(_features(n, s.wc_c, seed=10 + i))
        queries.append(_features(batch, h * w, s.wc_c, seed=20 + i))
    return tuple(banks), tuple(queries)


# --------------------------------------------------------------------------- sections


def backbone_case(name: str, aggregation: str) -> str:
    """Case name of a backbone: its name, plus the aggregation unless official."""
    return name if aggregation == "official" else f"{name} ({aggregation})"


def bench_extract(s: BenchSettings) -> list[dict[str, Any]]:
    """Feature extraction per backbone, aggregation and batch size."""
    rows = []
    for name in s.backbones:
        for aggregation in s.extract_aggregations:
            ext = get_extractor(name, aggregation, s.image_size)
            params = ext.init_params(jax.random.PRNGKey(0))
            info = {
                "shape": f"{s.image_size}px -> [{ext.grid[0] * ext.grid[1]}, {ext.feature_dim}]"
            }
            for b in s.batch_sizes:
                args = (params, _images(b, s.image_size))
                case = backbone_case(name, aggregation)
                rows += measure([Case("extract", case, "extract", b, ext.extract, args, info)], s)
    return rows


def bench_refine(s: BenchSettings) -> list[dict[str, Any]]:
    """`refine_and_score` alone: PatchCore+ and WinCLIP+ shapes, base vs refined."""
    rows = []
    m = s.pc_grid**2
    bank = _features(s.pc_n, s.pc_c, seed=1)
    pc_shape = f"m={m}, n={s.pc_n}, c={s.pc_c}"
    wc_shape = "m=" + "/".join(str(h * w) for h, w in winclip_grids(s.wc_grid))
    wc_shape += f", n=alpha*k*m, c={s.wc_c}"
    for b in s.batch_sizes:
        queries = _features(b, m, s.pc_c, seed=2)
        cases = [
            Case("refine", "patchcore_shape", method, b, refine_and_score, (bank, queries, cfg))
            for method, cfg in (
                ("patchcore", patchcore_config(s, s.pc_grid, use_refinement=False)),
                ("patchcore+", patchcore_config(s, s.pc_grid)),
            )
        ]
        rows += measure([c._replace(info={"shape": pc_shape}) for c in cases], s)
        rows.append(measure_api(rows[-1], refine_and_score, (bank, queries, cases[1].args[2]), s))
        banks, wq = winclip_inputs(s, b)
        cases = [
            Case("refine", "winclip_shape", method, b, winclip_refine, (banks, wq, cfgs))
            for method, cfgs in (
                ("winclip", winclip_refine_configs(s, use_refinement=False)),
                ("winclip+", winclip_refine_configs(s)),
            )
        ]
        rows += measure([c._replace(info={"shape": wc_shape}) for c in cases], s)
    return rows


def _detect_setup(s: BenchSettings):
    """WRN (or `--detect_backbone`) extractor, random params, a k-shot coreset bank."""
    ext = get_extractor(s.detect_backbone, s.aggregation, s.image_size)
    params = ext.init_params(jax.random.PRNGKey(0))
    support = ext.extract(params, _images(s.shots, s.image_size, seed=3))
    bank = build_bank(support, s.alpha).prototypes
    return ext, params, bank


def bench_detect(s: BenchSettings) -> list[dict[str, Any]]:
    """End-to-end `make_detect(extract)`: PatchCore vs PatchCore+ (shipped defaults)."""
    ext, params, bank = _detect_setup(s)
    detect = make_detect(ext.extract)
    grid = ext.grid[0]
    case = backbone_case(ext.name, s.aggregation)
    info = {
        "shape": f"{ext.name} {s.image_size}px, m={grid * grid}, n={bank.shape[0]}, "
        f"c={ext.feature_dim}"
    }
    rows = []
    for b in s.batch_sizes:
        images = _images(b, s.image_size)
        cases = [
            Case("detect", case, method, b, detect, (params, bank, images, cfg), info)
            for method, cfg in (
                ("patchcore", patchcore_config(s, grid, use_refinement=False)),
                ("patchcore+", patchcore_config(s, grid)),
            )
        ]
        rows += measure(cases, s)
    return rows


def _clip_spec(name: str):
    from protorefine_jax.clip import PRESETS, ClipSpec

    if name == "tiny":  # for the test suite: same program structure, toy widths
        return ClipSpec(
            image_size=64,
            vision_width=32,
            vision_layers=1,
            vision_heads=2,
            vision_mlp=64,
            text_width=32,
            text_layers=1,
            text_heads=2,
            text_mlp=64,
            vocab_size=256,
            embed_dim=16,
        )
    return PRESETS[name]


def bench_winclip(s: BenchSettings) -> list[dict[str, Any]]:
    """End-to-end WinCLIP vs WinCLIP+ `detect` (random-init CLIP, k-shot banks)."""
    from protorefine_jax.clip import build_banks, extract_multiscale, random_params, winclip_config
    from protorefine_jax.clip import detect as clip_detect

    spec = _clip_spec(s.clip_model)
    params = random_params(spec)
    size = spec.image_size
    base_cfg = winclip_config(use_refinement=False, clip=spec, precision=s.precision)
    plus_cfg = winclip_config(use_refinement=True, clip=spec, precision=s.precision)
    support = extract_multiscale(params, _images(s.shots, size, seed=3), plus_cfg)
    banks = tuple(b.prototypes for b in build_banks(support, s.wc_alpha))
    text = jax.device_put(_rng(4).standard_normal((2, spec.embed_dim)).astype(np.float32))
    info = {
        "shape": f"{s.clip_model} {size}px, n="
        + "/".join(str(b.shape[0]) for b in banks)
        + f", c={banks[0].shape[1]}"
    }
    rows = []
    for b in s.winclip_batch_sizes:
        images = _images(b, size)
        cases = [
            Case("winclip", s.clip_model, m, b, clip_detect, (params, banks, text, images, c), info)
            for m, c in (("winclip", base_cfg), ("winclip+", plus_cfg))
        ]
        rows += measure(cases, s)
    return rows


def bench_profile(s: BenchSettings) -> dict[str, Any]:
    """Where the refinement's time goes: ablated configs at `--profile_batch`.

    PatchCore+ shape: base scoring, W only (no transport), 1 EM iteration,
    1 Sinkhorn iteration, the default. WinCLIP+ shape (3 scales): the same with
    1 optax inner step instead of 1 EM iteration. Shares are derived by
    differences of the fastest repeats (`derive_profile`): machine load only
    ever adds time, so the minimum is the steadier basis for a difference.
    """
    b = s.profile_batch
    bank, queries = _features(s.pc_n, s.pc_c, seed=1), _features(b, s.pc_grid**2, s.pc_c, seed=2)
    pc = lambda **f: patchcore_config(s, s.pc_grid, **f)
    wc = lambda **f: winclip_refine_configs(s, **f)
    wc_inputs = winclip_inputs(s, b)
    variants = {
        "patchcore_shape": (
            refine_and_score,
            lambda cfg: (bank, queries, cfg),
            {
                "base": pc(use_refinement=False),
                "w_only": pc(use_transport=False),
                "em_1": pc(num_iters=1),
                "sinkhorn_1": pc(sinkhorn_iters=1),
                "default": pc(),
            },
        ),
        "winclip_shape": (
            winclip_refine,
            lambda cfg: (*wc_inputs, cfg),
            {
                "base": wc(use_refinement=False),
                "w_only": wc(use_transport=False),
                "inner_1": wc(inner_steps=1),
                "sinkhorn_1": wc(sinkhorn_iters=1),
                "default": wc(),
            },
        ),
    }
    default = RefineConfig()
    out: dict[str, Any] = {"rows": []}
    for case, (fn, make_args, configs) in variants.items():
        cases = [Case("profile", case, k, b, fn, make_args(c)) for k, c in configs.items()]
        rows = measure(cases, s)
        out["rows"] += rows
        out[case] = derive_profile(
            {r["method"]: 1e3 * r["min_s"] / b for r in rows},
            default.num_iters,
            default.sinkhorn_iters,
            default.inner_steps,
        )
    return out


def derive_profile(ms: dict[str, float], em: int, sk: int, inner: int) -> dict[str, float]:
    """Shares of the refined time from timings of ablated configs.

    Args:
      ms: ms per query of `base`, `w_only`, `default` and some of `em_1`,
        `sinkhorn_1`, `inner_1`.
      em: EM iterations of the default.
      sk: Sinkhorn iterations per E-step of the default.
      inner: optax inner steps per M-step of the default.

    Returns:
      ms and percentages of the default's time: the base scoring, the
      least-squares init and refined scoring (`w_only - base`), the EM loop
      (`default - w_only`), all Sinkhorn iterations (`(default - sinkhorn_1)
      * sk / (sk - 1)`), all optax inner steps, one EM iteration.
    """
    total = ms["default"]
    out = {
        "refined_ms": total,
        "base_ms": ms["base"],
        "lsq_and_scoring_ms": ms["w_only"] - ms["base"],
        "em_loop_ms": total - ms["w_only"],
    }
    if "em_1" in ms:
        out["per_em_iteration_ms"] = (total - ms["em_1"]) / (em - 1)
    if "sinkhorn_1" in ms:
        out["sinkhorn_ms"] = (total - ms["sinkhorn_1"]) * sk / (sk - 1)
    if "inner_1" in ms:
        out["optax_inner_steps_ms"] = (total - ms["inner_1"]) * inner / (inner - 1)
    for key in list(out):
        if key != "refined_ms":
            out[key.replace("_ms", "_pct")] = 100.0 * out[key] / total
    return out


def _device_counts(available: int, limit: int | None) -> list[int]:
    top = min(available, limit or available)
    return sorted({2**i for i in range(int(math.log2(top)) + 1)} | {top})


def bench_sharding(s: BenchSettings) -> list[dict[str, Any]]:
    """Scaling of `refine_and_score` and `detect` over 1..N devices (batch sharded).

    Per device count: the compiled program on pre-placed inputs (pure compute)
    and `run_sharded` on host inputs (placement and output trim included), plus
    whether the outputs really are split over the devices and match 1 device.
    """
    counts = _device_counts(jax.device_count(), s.devices)
    batch = -(-(s.sharding_batch or max(s.batch_sizes)) // counts[-1]) * counts[-1]
    bank = np.asarray(_features(s.pc_n, s.pc_c, seed=1))
    queries = np.asarray(_features(batch, s.pc_grid**2, s.pc_c, seed=2))
    ext, params, dbank = _detect_setup(s)
    images = np.asarray(_images(batch, s.image_size))
    detect_args = (params, dbank, images, patchcore_config(s, ext.grid[0]))
    fns = {
        "refine_and_score": (refine_and_score, (bank, queries, patchcore_config(s, s.pc_grid)), 1),
        f"detect {ext.name}": (make_detect(ext.extract), detect_args, 2),
    }
    rows = []
    for name, (fn, args, argnum) in fns.items():
        group = []
        for d in counts:
            mesh = batch_mesh(jax.devices()[:d])
            placed = [
                shard_batch(a, mesh) if i == argnum else replicate(a, mesh)
                for i, a in enumerate(args)
            ]
            case = Case("sharding", name, "patchcore+", batch, fn, tuple(placed), {"devices": d})
            (row,) = measure([case], s)
            out = fn(*placed)
            sharding = out.image_scores.sharding
            row["output_sharded"] = len(sharding.device_set) == d and (
                d == 1 or not sharding.is_fully_replicated
            )
            scores = np.asarray(out.image_scores)
            ref = group[0]["scores"] if group else scores
            row["rel_diff_vs_1_device"] = float(
                np.max(np.abs(scores - ref)) / max(float(np.max(np.abs(ref))), 1e-30)
            )
            call = lambda fn=fn, args=args, argnum=argnum, mesh=mesh: run_sharded(
                fn, args, argnum, mesh
            )
            (ts,) = time_calls([call], s.repeats, max(s.warmup, 1))
            row["run_sharded_median_s"] = statistics.median(ts)
            row["run_sharded_images_per_s"] = batch / statistics.median(ts)
            group.append(dict(row, scores=scores))
            rows.append(row)
        for row in rows[-len(counts) :]:
            row["speedup"] = rows[-len(counts)]["median_s"] / row["median_s"]
            row["efficiency"] = row["speedup"] / row["devices"]
    return rows


def bench_precision(s: BenchSettings) -> dict[str, Any]:
    """Scores of float32 / tf32 / bfloat16 `RefineConfig.precision` on the demo data.

    Same features, same banks (synthetic MVTec-layout data, `--precision_backbone`
    with its shipped weights); per category and method, the max abs difference
    of image scores and maps to float32 (also relative to the float32 score
    range) and image / pixel AUROC per precision.
    """
    from experiments import runner
    from experiments.hosts import PatchCoreHost
    from experiments.methods import get_method
    from protorefine_jax.data import load_dataset_category, make_synthetic_dataset, sample_support
    from protorefine_jax.metrics import evaluate

    host = PatchCoreHost(
        s.precision_backbone, s.aggregation, s.image_size, s.precision_weights, batch_size=8
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="protorefine_bench_") as tmp:
        root = make_synthetic_dataset(
            tmp, s.precision_categories, *s.precision_counts, image_size=256, seed=0
        )
        for category in s.precision_categories:
            data = load_dataset_category("folder", root, category, host.image_size)
            test = runner.load_test_set(data, host)
            support = sample_support(data.train_good, s.shots, s.precision_seed, root=data.root)
            bank = host.build_bank(host.features(data.load_images(support.paths)), s.alpha)
            for name in ("patchcore", "patchcore+"):
                method = get_method(name)
                results = {}
                for precision in ("float32", "tf32", "bfloat16"):
                    fields = runner.refine_fields(runner.Settings(precision=precision), "patchcore")
                    cfg = host.base_config(**fields).replace(**method.overrides)
                    order = np.arange(len(test["labels"]))
                    results[precision] = host.score(bank, test["features"], method, cfg, order, {})
                ref = results["float32"]
                score_range = float(np.ptp(ref.image_scores)) or 1.0
                map_range = float(np.ptp(ref.maps)) or 1.0
                for precision, res in results.items():
                    metrics = evaluate(test["labels"], res.image_scores, test["masks"], res.maps)
                    d_img = float(np.max(np.abs(res.image_scores - ref.image_scores)))
                    d_map = float(np.max(np.abs(res.maps - ref.maps)))
                    rows.append(
                        {
                            "category": category,
                            "method": name,
                            "precision": precision,
                            "max_abs_image_diff": d_img,
                            "rel_image_diff": d_img / score_range,
                            "max_abs_map_diff": d_map,
                            "rel_map_diff": d_map / map_range,
                            "image_auroc": metrics["image_auroc"],
                            "pixel_auroc": metrics["pixel_auroc"],
                            "bank_size": int(bank.prototypes.shape[0]),
                        }
                    )
                    print(
                        f"[precision] {category} {name} {precision}: "
                        f"rel image diff {d_img / score_range:.2e}, "
                        f"image AUROC {metrics['image_auroc']:.2f}",
                        flush=True,
                    )
    return {"features": host.describe(), "shots": s.shots, "rows": rows}


# --------------------------------------------------------------------------- report


def ratios(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Refined / base time per (section, case, batch), with the backbone share.

    Args:
      rows: measured rows of the `refine`, `detect` and `winclip` sections
        (and `extract`, for the backbone's time per image).

    Returns:
      One entry per pair: base and refined ms per image, the ratio, and for
      `detect` the extraction ms per image of the same backbone and batch.
    """
    pairs = {"patchcore": "patchcore+", "winclip": "winclip+"}
    index = {(r["section"], r["case"], r["method"], r["batch"]): r for r in rows}
    out = []
    for (section, case, method, batch), base in index.items():
        refined = index.get((section, case, pairs.get(method), batch))
        if section not in ("refine", "detect", "winclip") or refined is None:
            continue
        entry = {
            "section": section,
            "case": case,
            "batch": batch,
            "base": method,
            "base_ms_per_image": base["ms_per_image"],
            "refined_ms_per_image": refined["ms_per_image"],
            "ratio": refined["median_s"] / base["median_s"],
            "ratio_of_min": refined["min_s"] / base["min_s"],
            "refined_images_per_s": refined["images_per_s"],
        }
        ext = index.get(("extract", case, "extract", batch))
        if section == "detect" and ext is not None:
            entry["extract_ms_per_image"] = ext["ms_per_image"]
            entry["backbone_pct_of_refined"] = 100 * ext["ms_per_image"] / refined["ms_per_image"]
        out.append(entry)
    return out


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool | str | int):
        return str(x)
    if x != x:  # nan
        return "nan"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _columns(spec: str) -> list[tuple[str, str]]:
    """`"header=key, ..."` -> `[(header, key), ...]`."""
    return [tuple(part.split("=")) for part in spec.split(", ")]


def _table(columns: Sequence[tuple[str, str]], rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for _, k in columns) + " |" for r in rows]
    return "\n".join(lines)


_TIMING = _columns(
    "case=case, method=method, batch=batch, lower s=lower_s, compile s=compile_s, "
    "ms/img=ms_per_image, spread %=spread_pct, img/s=images_per_s, GFLOP/img=gflop_per_image, "
    "XLA GFLOP/img=xla_gflop_per_image, TFLOP/s=tflop_per_s, temp MB=temp_mb, peak MB=peak_mb"
)
_RATIOS = _columns(
    "section=section, case=case, batch=batch, base=base, base ms/img=base_ms_per_image, "
    "refined ms/img=refined_ms_per_image, ratio=ratio, ratio of min=ratio_of_min, "
    "refined img/s=refined_images_per_s, backbone ms/img=extract_ms_per_image, "
    "backbone % of refined=backbone_pct_of_refined"
)
_SHARDING = _columns(
    "case=case, devices=devices, batch=batch, ms/img=ms_per_image, img/s=images_per_s, "
    "speedup=speedup, efficiency=efficiency, run_sharded img/s=run_sharded_images_per_s, "
    "outputs sharded=output_sharded, rel diff vs 1 device=rel_diff_vs_1_device"
)
_PRECISION = _columns(
    "category=category, method=method, precision=precision, "
    "max abs image diff=max_abs_image_diff, rel image diff=rel_image_diff, "
    "max abs map diff=max_abs_map_diff, rel map diff=rel_map_diff, "
    "image AUROC=image_auroc, pixel AUROC=pixel_auroc"
)
_SECTION_TITLES = {
    "extract": "Feature extraction",
    "refine": "`refine_and_score` alone",
    "detect": "End-to-end `detect` (PatchCore vs PatchCore+)",
    "winclip": "End-to-end WinCLIP vs WinCLIP+ `detect`",
}


def markdown(result: dict[str, Any]) -> str:
    """The whole result as markdown tables."""
    m = result["machine"]
    parts = [
        f"Machine: {m['device_kind']} x{m['device_count']} ({m['backend']}), "
        f"{m['cpu_count']} CPUs ({m['cpu_model']}), jax {m['jax']}, "
        f"load average at start {m['load_average']}, at end {result['load_average_end']}; "
        f"sections {', '.join(result['settings']['sections'])}; "
        f"{result['settings']['repeats']} timed repeats (median); wall {result['wall_s']:.0f} s."
    ]
    rows = result.get("rows", [])
    for section, title in _SECTION_TITLES.items():
        sel = [r for r in rows if r["section"] == section]
        if sel:
            parts.append(f"### {title}\n\n" + _table(_TIMING, sel))
    if result.get("ratios"):
        title = "### Refined / base (same run, interleaved calls)\n\n"
        parts.append(title + _table(_RATIOS, result["ratios"]))
    prof = result.get("profile")
    if prof:
        batch = result["settings"]["profile_batch"]
        parts.append(
            f"### Profile of the refinement (batch {batch})\n\n" + _table(_TIMING, prof["rows"])
        )
        shapes = [k for k in ("patchcore_shape", "winclip_shape") if k in prof]
        keys = sorted({k for shape in shapes for k in prof[shape]})
        derived = [{"quantity": k, **{x: prof[x].get(k) for x in shapes}} for k in keys]
        cols = [("quantity (from min times)", "quantity")] + [(x, x) for x in shapes]
        parts.append(_table(cols, derived))
    if result.get("sharding"):
        title = "### Scaling over devices (batch sharded)\n\n"
        parts.append(title + _table(_SHARDING, result["sharding"]))
    prec = result.get("precision")
    if prec:
        title = f"### Precision vs float32 ({prec['features']['backbone']}, {prec['shots']}-shot)"
        parts.append(title + "\n\n" + _table(_PRECISION, prec["rows"]))
    return "\n\n".join(parts) + "\n"


def run(s: BenchSettings) -> dict[str, Any]:
    """Runs the requested sections; returns the JSON-ready result."""
    s = resolve(s)
    start = time.time()
    result: dict[str, Any] = {
        "machine": machine_info(),
        "settings": dataclasses.asdict(s),
        "command": " ".join(getattr(sys, "orig_argv", sys.argv)),
        "paper_seconds_per_image": PAPER_SECONDS_PER_IMAGE,
    }
    rows: list[dict[str, Any]] = []
    timed = {"extract": bench_extract, "refine": bench_refine, "detect": bench_detect}
    timed["winclip"] = bench_winclip
    for section in s.sections:
        if section in timed:
            rows += timed[section](s)
    result["rows"] = rows
    result["ratios"] = ratios(rows)
    if "profile" in s.sections:
        result["profile"] = bench_profile(s)
    if "sharding" in s.sections:
        result["sharding"] = bench_sharding(s)
    if "precision" in s.sections:
        result["precision"] = bench_precision(s)
    result["wall_s"] = time.time() - start
    result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


# --------------------------------------------------------------------------- CLI


def define_flags() -> None:
    """Defines the CLI flags (only when run as a script, so importing is free)."""
    flags.DEFINE_list("sections", [], f"Subset of {list(SECTIONS)}; default: all but precision")
    flags.DEFINE_bool("precision_check", False, "Run only the precision check (the demo data).")
    flags.DEFINE_list("batch_sizes", [], "Batch sizes; default 1,8 on CPU, 1..256 elsewhere.")
    flags.DEFINE_list("winclip_batch_sizes", [], "WinCLIP detect batch sizes (default 1 on CPU).")
    flags.DEFINE_integer("repeats", 5, "Timed calls per entry (median reported).")
    flags.DEFINE_integer("warmup", 1, "Untimed calls after compilation.")
    flags.DEFINE_list("backbones", list(BenchSettings.backbones), "Backbones of `extract`.")
    flags.DEFINE_string("detect_backbone", "wide_resnet50_2", "Backbone of end-to-end detect.")
    flags.DEFINE_enum("aggregation", "official", ["official", "simple"], "Aggregation of detect.")
    flags.DEFINE_list("extract_aggregations", ["official"], "Aggregations of `extract`.")
    flags.DEFINE_integer("image_size", 256, "CNN input side (pixels).")
    flags.DEFINE_integer("shots", 2, "Support images per bank.")
    flags.DEFINE_float("alpha", 0.05, "PatchCore coreset ratio.")
    flags.DEFINE_integer("pc_grid", 32, "refine_and_score PatchCore+ shape: grid side (m=g*g).")
    flags.DEFINE_integer("pc_n", 102, "refine_and_score PatchCore+ shape: bank size n.")
    flags.DEFINE_integer("pc_c", 1024, "refine_and_score PatchCore+ shape: feature dim c.")
    flags.DEFINE_integer("wc_grid", 15, "WinCLIP+ shape: patch grid side (windows 2, 3).")
    flags.DEFINE_integer("wc_c", 640, "WinCLIP+ shape: feature dim c.")
    flags.DEFINE_float("wc_alpha", 0.5, "WinCLIP+ coreset ratio (n = alpha * shots * m).")
    flags.DEFINE_string("clip_model", "ViT-B-16-plus-240", "CLIP preset (or 'tiny') of winclip.")
    flags.DEFINE_enum(
        "precision", "float32", ["float32", "tf32", "bfloat16"], "RefineConfig.precision."
    )
    flags.DEFINE_integer("profile_batch", None, "Batch of the profile (default 2 CPU, 64 GPU).")
    flags.DEFINE_integer("devices", None, "Devices for sharding; on CPU re-execs with N fakes.")
    flags.DEFINE_integer(
        "openblas_threads", None, "CPU: OPENBLAS_NUM_THREADS to re-exec with (default 1; 0: as is)."
    )
    flags.DEFINE_integer("sharding_batch", None, "Batch of the sharding section (default max).")
    flags.DEFINE_string("precision_backbone", "efficientnet_lite0", "Backbone of the check.")
    flags.DEFINE_string(
        "precision_weights", "", "Weights of the check ('' shipped Lite weights, 'random')."
    )
    flags.DEFINE_list("precision_categories", ["fabric", "grain"], "Synthetic categories.")
    flags.DEFINE_list("precision_counts", ["10", "10", "10"], "Train, test-good, test-defect.")
    flags.DEFINE_integer("precision_seed", 0, "Support seed of the precision check.")
    flags.DEFINE_string("out", None, "JSON output path.")
    flags.DEFINE_string("markdown_out", None, "Optional markdown output path.")


def settings_from_flags() -> BenchSettings:
    """`BenchSettings` from the parsed flags."""
    f = flags.FLAGS
    ints = lambda xs: tuple(int(x) for x in xs)
    return BenchSettings(
        sections=("precision",) if f.precision_check else tuple(f.sections),
        batch_sizes=ints(f.batch_sizes),
        winclip_batch_sizes=ints(f.winclip_batch_sizes),
        repeats=f.repeats,
        warmup=f.warmup,
        backbones=tuple(f.backbones),
        detect_backbone=f.detect_backbone,
        aggregation=f.aggregation,
        extract_aggregations=tuple(f.extract_aggregations),
        image_size=f.image_size,
        shots=f.shots,
        alpha=f.alpha,
        pc_grid=f.pc_grid,
        pc_n=f.pc_n,
        pc_c=f.pc_c,
        wc_grid=f.wc_grid,
        wc_c=f.wc_c,
        wc_alpha=f.wc_alpha,
        clip_model=f.clip_model,
        precision=f.precision,
        profile_batch=f.profile_batch,
        devices=f.devices,
        sharding_batch=f.sharding_batch,
        precision_backbone=f.precision_backbone,
        precision_weights=f.precision_weights,
        precision_categories=tuple(f.precision_categories),
        precision_counts=ints(f.precision_counts),
        precision_seed=f.precision_seed,
    )


def _environment_changes(s: BenchSettings, openblas_threads: int | None) -> dict[str, str]:
    """Environment this run needs before jax and BLAS initialise (CPU only).

    `--devices=N` on CPU needs N fake host devices (`XLA_FLAGS`). On CPU,
    XLA's LAPACK calls (Cholesky, triangular solves) run in scipy's OpenBLAS,
    whose own thread pool competes with XLA's: measured on a loaded 2-core
    machine, every triangular solve above a tiny size then stalls about 16 ms
    (1.6 ms with one thread). `OPENBLAS_NUM_THREADS=1` (the default here on
    CPU; `--openblas_threads=0` leaves the environment alone) avoids that.
    """
    if jax.default_backend() != "cpu":
        return {}
    env = {}
    if s.devices and jax.device_count() < s.devices:
        flag = f"--xla_force_host_platform_device_count={s.devices}"
        env["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    threads = 1 if openblas_threads is None else openblas_threads
    if threads and os.environ.get("OPENBLAS_NUM_THREADS") != str(threads):
        env["OPENBLAS_NUM_THREADS"] = str(threads)
    return env


def _reexec(env: dict[str, str]) -> None:
    """Restarts this process with `env` added (jax and BLAS read it at start-up)."""
    if os.environ.get(_REEXEC_ENV):
        raise RuntimeError(f"environment {env} still not in effect after re-executing.")
    print(f"re-executing with {env}", flush=True)
    argv = list(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    os.execve(sys.executable, [sys.executable, *argv[1:]], {**os.environ, **env, _REEXEC_ENV: "1"})


def main(argv: Sequence[str]) -> None:
    """Parses flags, runs, prints markdown, writes JSON (and markdown) files."""
    del argv
    s = settings_from_flags()
    env = _environment_changes(s, flags.FLAGS.openblas_threads)
    if env:
        _reexec(env)
    result = run(s)
    text = markdown(result)
    print(text)
    if flags.FLAGS.out:
        with open(flags.FLAGS.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {flags.FLAGS.out}")
    if flags.FLAGS.markdown_out:
        with open(flags.FLAGS.markdown_out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    define_flags()
    app.run(main)
