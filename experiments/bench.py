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

The `winclip` section also times the multi-scale CLIP features alone (method
`extract`); the `profile` section times the default refinement in both
`RefineConfig.sinkhorn_mode`s. This module holds the flags, settings, `run`
and `main`; the machinery is in `bench_lib`, the sections in `bench_sections`
(extract, refine, detect, winclip) and `bench_analyses` (profile, sharding,
precision), the derived ratios and markdown in `bench_report`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
from absl import app, flags

from experiments.bench_analyses import bench_precision, bench_profile, bench_sharding
from experiments.bench_report import markdown, ratios
from experiments.bench_sections import bench_detect, bench_extract, bench_refine, bench_winclip
from experiments.bench_settings import BenchSettings
from protorefine_jax.app.batching import HOST_DEVICES_FLAG
from protorefine_jax.app.runner import machine_info

PAPER_SECONDS_PER_IMAGE = {"patchcore": 0.21, "patchcore+": 0.49, "winclip": 0.50, "winclip+": 0.81}
"""Paper Table 3 (MVTec, RTX 3090), seconds per image."""

SECTIONS = ("extract", "refine", "detect", "winclip", "profile", "sharding", "precision")
_REEXEC_ENV = "PROTOREFINE_BENCH_REEXEC"


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
    timed = {
        "extract": bench_extract,
        "refine": bench_refine,
        "detect": bench_detect,
        "winclip": bench_winclip,
    }
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
    flags.DEFINE_float("alpha", BenchSettings.alpha, "PatchCore coreset ratio.")
    flags.DEFINE_integer("pc_grid", 32, "refine_and_score PatchCore+ shape: grid side (m=g*g).")
    flags.DEFINE_integer("pc_n", 102, "refine_and_score PatchCore+ shape: bank size n.")
    flags.DEFINE_integer("pc_c", 1024, "refine_and_score PatchCore+ shape: feature dim c.")
    flags.DEFINE_integer("wc_grid", 15, "WinCLIP+ shape: patch grid side (windows 2, 3).")
    flags.DEFINE_integer("wc_c", 640, "WinCLIP+ shape: feature dim c.")
    flags.DEFINE_float(
        "wc_alpha", None, "WinCLIP+ coreset ratio (n = alpha * shots * m); default MVTec's."
    )
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
        flag = f"{HOST_DEVICES_FLAG}={s.devices}"
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
