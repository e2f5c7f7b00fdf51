"""The benchmark: a tiny end-to-end run (subprocess), FLOP counting, derived numbers.

No timing is asserted: only that every section runs and reports what it must.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench, bench_analyses, bench_lib, bench_report

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--batch_sizes=2",
    "--repeats=1",
    "--warmup=0",
    "--backbones=efficientnet_lite0",
    "--detect_backbone=efficientnet_lite0",
    "--image_size=64",
    "--pc_grid=8",
    "--pc_n=10",
    "--pc_c=32",
    "--wc_grid=5",
    "--wc_c=16",
]
TIMING_KEYS = (
    "lower_s",
    "compile_s",
    "median_s",
    "min_s",
    "max_s",
    "ms_per_image",
    "images_per_s",
    "gflop_per_image",
    "xla_gflop_per_image",
    "tflop_per_s",
)


def run_bench(tmp_path, *args, timeout=300):
    out = tmp_path / "bench.json"
    # One BLAS thread already set: the script does not need to re-execute itself.
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench", *TINY, *args, f"--out={out}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def check_timing_row(row):
    for key in TIMING_KEYS:
        assert row[key] > 0, (key, row)
    assert len(row["times_s"]) == 1
    assert row["peak_mb"] is None or row["peak_mb"] > 0


def test_tiny_run_reports_every_timed_section(tmp_path):
    result, stdout = run_bench(tmp_path, "--sections=extract,refine,detect")
    machine = result["machine"]
    for key in ("platform", "jax", "backend", "device", "num_devices", "cpu_count"):
        assert machine[key], key
    assert result["settings"]["batch_sizes"] == [2]
    rows = result["rows"]
    got = {(r["section"], r["case"], r["method"]) for r in rows}
    assert got == {
        ("extract", "efficientnet_lite0", "extract"),
        ("refine", "patchcore_shape", "patchcore"),
        ("refine", "patchcore_shape", "patchcore+"),
        ("refine", "patchcore_shape", "patchcore+ (API call)"),
        ("refine", "winclip_shape", "winclip"),
        ("refine", "winclip_shape", "winclip+"),
        ("detect", "efficientnet_lite0", "patchcore"),
        ("detect", "efficientnet_lite0", "patchcore+"),
    }
    for row in rows:
        assert row["batch"] == 2
        if row["method"].endswith("(API call)"):  # timed as called: no lowering of its own
            assert row["median_s"] > 0 and row["images_per_s"] > 0
        else:
            check_timing_row(row)
    # The loop-aware count sees the EM iterations that XLA's count folds into
    # one (1.7x at this tiny shape with 10 Sinkhorn iterations per E-step).
    refined = next(r for r in rows if r["method"] == "patchcore+" and r["section"] == "refine")
    assert refined["gflop_per_image"] > 1.5 * refined["xla_gflop_per_image"]
    pairs = {(r["section"], r["case"]): r for r in result["ratios"]}
    assert set(pairs) == {
        ("refine", "patchcore_shape"),
        ("refine", "winclip_shape"),
        ("detect", "efficientnet_lite0"),
    }
    for entry in pairs.values():
        assert entry["ratio"] > 0 and entry["ratio_of_min"] > 0
    assert pairs["detect", "efficientnet_lite0"]["extract_ms_per_image"] > 0
    assert "| efficientnet_lite0 | patchcore+ | 2 |" in stdout


@pytest.mark.slow
def test_tiny_run_of_profile_sharding_winclip_and_precision(tmp_path):
    result, _ = run_bench(
        tmp_path,
        "--sections=winclip,profile,sharding,precision",
        "--profile_batch=2",
        "--clip_model=tiny",
        "--winclip_batch_sizes=2",
        "--devices=2",
        "--precision_weights=random",
        "--precision_counts=3,3,3",
        "--precision_categories=fabric",
        timeout=900,
    )
    assert result["machine"]["num_devices"] == 2  # re-executed with fake devices
    winclip = [r for r in result["rows"] if r["section"] == "winclip"]
    assert {r["method"] for r in winclip} == {"extract", "winclip", "winclip+"}
    for row in winclip:
        check_timing_row(row)
    (pair,) = [e for e in result["ratios"] if e["section"] == "winclip"]
    assert 0 < pair["backbone_pct_of_refined"] < 100
    prof = result["profile"]
    assert {r["method"] for r in prof["rows"] if r["case"] == "patchcore_shape"} == {
        "base",
        "w_only",
        "em_1",
        "sinkhorn_1",
        "default",
        "sinkhorn_log",
    }
    for shape in ("patchcore_shape", "winclip_shape"):
        for key in ("sinkhorn_pct", "sinkhorn_log_ms", "sinkhorn_absorbed_ms", "refined_log_ms"):
            assert key in prof[shape], (shape, key)
        assert prof[shape]["sinkhorn_ms"] == prof[shape]["sinkhorn_absorbed_ms"]
    assert "optax_inner_steps_pct" in prof["winclip_shape"]
    shard = result["sharding"]
    assert [r["devices"] for r in shard] == [1, 2] * 3
    methods = [r["method"] for r in shard]
    assert methods == ["patchcore+"] * 2 + ["patchcore"] * 2 + ["patchcore+"] * 2
    for row in shard:
        check_timing_row(row)
        assert row["output_sharded"]
        assert row["rel_diff_vs_1_device"] < 1e-4
        assert row["run_sharded_images_per_s"] > 0
    prec = result["precision"]["rows"]
    assert {(r["method"], r["precision"]) for r in prec} == {
        (m, p) for m in ("patchcore", "patchcore+") for p in ("float32", "tf32", "bfloat16")
    }
    for row in prec:
        assert 0 <= row["image_auroc"] <= 100 and 0 <= row["pixel_auroc"] <= 100
        if row["precision"] == "float32":
            assert row["max_abs_image_diff"] == 0


def test_jaxpr_flops_matches_xla_without_loops_and_multiplies_scans():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((32, 48)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((48, 16)), jnp.float32)
    images = jnp.asarray(rng.standard_normal((2, 16, 16, 3)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 8)), jnp.float32)

    def loop_free(x, y, images, kernel):
        conv = jax.lax.conv_general_dilated(
            images, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.sum(x @ y), jnp.max(conv)

    traced = jax.jit(loop_free).trace(x, y, images, kernel)
    flops, _ = bench_lib.jaxpr_flops(traced.jaxpr.jaxpr)
    xla = traced.lower().compile().cost_analysis()
    xla = (xla[0] if isinstance(xla, list) else xla)["flops"]
    matmul, conv = 2 * 32 * 48 * 16, 2 * (2 * 14 * 14 * 8) * (3 * 3 * 3)
    assert flops >= matmul + conv
    # XLA skips the zero taps of padded convolutions; VALID has none.
    np.testing.assert_allclose(flops, xla, rtol=0.01)

    def looped(x):
        square = jnp.asarray(np.eye(48), jnp.float32)
        return jax.lax.fori_loop(0, 10, lambda i, a: a @ square, x)

    flops, _ = bench_lib.jaxpr_flops(jax.make_jaxpr(looped)(x).jaxpr)
    np.testing.assert_allclose(flops, 10 * 2 * 32 * 48 * 48, rtol=0.01)


def test_derive_profile_shares():
    ms = {"base": 1.0, "w_only": 3.0, "em_1": 4.0, "sinkhorn_1": 5.0, "default": 13.0}
    out = bench_analyses.derive_profile(ms, em=10, sk=30, inner=10)
    assert out["em_loop_ms"] == pytest.approx(10.0)
    assert out["lsq_and_scoring_ms"] == pytest.approx(2.0)
    assert out["per_em_iteration_ms"] == pytest.approx(1.0)
    # Without the other mode's timing: equal iterations assumed.
    assert out["sinkhorn_ms"] == pytest.approx(8.0 * 30 / 29)
    assert out["em_loop_pct"] == pytest.approx(100 * 10 / 13)
    assert "sinkhorn_log_ms" not in out


def test_derive_profile_splits_sinkhorn_by_mode():
    # One log iteration L = 1 ms: sinkhorn_1 = 5 + 1 (rest + L), log = 5 + 30 L = 35;
    # absorbed: L plus 29 kernel iterations of 0.2 ms = 5 + 1 + 5.8 = 11.8.
    ms = {"base": 1.0, "w_only": 3.0, "sinkhorn_1": 6.0, "default": 11.8, "sinkhorn_log": 35.0}
    out = bench_analyses.derive_profile(ms, em=10, sk=30, inner=10, mode="absorbed")
    assert out["sinkhorn_log_ms"] == pytest.approx(30.0)
    assert out["sinkhorn_absorbed_ms"] == pytest.approx(1.0 + 29 * 0.2)
    assert out["sinkhorn_ms"] == out["sinkhorn_absorbed_ms"]
    assert out["sinkhorn_log_over_absorbed"] == pytest.approx(30.0 / 6.8)
    assert out["refined_log_ms"] == 35.0
    assert out["sinkhorn_pct"] == pytest.approx(100 * 6.8 / 11.8)
    # The same timings with log as the default mode.
    ms = {"base": 1.0, "w_only": 3.0, "sinkhorn_1": 6.0, "default": 35.0}
    out = bench_analyses.derive_profile({**ms, "sinkhorn_absorbed": 11.8}, 10, 30, 10, "log")
    assert out["sinkhorn_ms"] == pytest.approx(30.0)
    assert out["sinkhorn_absorbed_ms"] == pytest.approx(6.8)
    assert out["refined_absorbed_ms"] == 11.8


def test_ratios_pair_base_and_refined_rows():
    def row(section, case, method, median, batch=4):
        return dict(
            section=section,
            case=case,
            method=method,
            batch=batch,
            median_s=median,
            min_s=median / 2,
            ms_per_image=1e3 * median / batch,
            images_per_s=batch / median,
        )

    rows = [
        row("extract", "wrn", "extract", 0.8),
        row("detect", "wrn", "patchcore", 1.0),
        row("detect", "wrn", "patchcore+", 1.2),
        row("refine", "winclip_shape", "winclip", 0.1),
    ]
    (entry,) = bench_report.ratios(rows)
    assert entry["ratio"] == pytest.approx(1.2)
    assert entry["backbone_pct_of_refined"] == pytest.approx(100 * 0.8 / 1.2)
    rows += [
        row("winclip", "tiny", "extract", 0.4),
        row("winclip", "tiny", "winclip", 0.5),
        row("winclip", "tiny", "winclip+", 1.0),
    ]
    entries = {e["section"]: e for e in bench_report.ratios(rows)}
    assert set(entries) == {"detect", "winclip"}
    assert entries["winclip"]["ratio"] == pytest.approx(2.0)
    assert entries["winclip"]["backbone_pct_of_refined"] == pytest.approx(40.0)


def test_device_counts_and_settings_errors():
    assert bench_analyses.device_counts(8, None) == [1, 2, 4, 8]
    assert bench_analyses.device_counts(6, None) == [1, 2, 4, 6]
    assert bench_analyses.device_counts(8, 2) == [1, 2]
    with pytest.raises(ValueError, match="unknown sections"):
        bench.resolve(bench.BenchSettings(sections=("speed",)))
    with pytest.raises(ValueError, match="batch sizes"):
        bench.resolve(bench.BenchSettings(batch_sizes=(0,)))


def test_bench_ab_imports_a_checkout_under_another_name():
    from experiments import bench_ab

    root = Path(__file__).resolve().parents[1]
    pipeline_b, detectors_b = bench_ab.import_before(root)
    assert pipeline_b.__name__ == "protorefine_before.pipeline"
    assert "protorefine_jax" not in Path(pipeline_b.__file__).read_text()
    assert detectors_b.PatchCore is not None
    with pytest.raises(FileNotFoundError, match="not a protorefine_jax package"):
        bench_ab.import_before(root / "tests")
