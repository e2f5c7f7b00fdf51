"""Sections of `experiments.bench` that report their own block: profile, sharding, precision.

`bench_profile` splits the refinement's time by timing ablated configs
(Sinkhorn in both `RefineConfig.sinkhorn_mode`s), `bench_sharding` the
scaling over devices, `bench_precision` what tf32 / bfloat16 feature products
change in the scores and AUROC of the demo data.
"""

from __future__ import annotations

import math
import statistics
import tempfile
from typing import Any

import jax
import numpy as np

from experiments.bench_lib import Case, measure, time_calls
from experiments.bench_sections import (
    detect_setup,
    features,
    images,
    patchcore_config,
    winclip_inputs,
    winclip_refine,
    winclip_refine_configs,
)
from experiments.bench_settings import BenchSettings
from protorefine_jax import RefineConfig, make_detect, refine_and_score
from protorefine_jax.app import runner
from protorefine_jax.app.batching import BatchedDetector
from protorefine_jax.app.methods import get_method
from protorefine_jax.data import load_dataset_category, make_synthetic_dataset, sample_support
from protorefine_jax.detectors import PatchCore, bank_size
from protorefine_jax.metrics import evaluate
from protorefine_jax.sharding import batch_mesh, replicate, run_sharded, shard_batch

_MODES = ("absorbed", "log")


def bench_profile(s: BenchSettings) -> dict[str, Any]:
    """Where the refinement's time goes: ablated configs at `--profile_batch`.

    PatchCore+ shape: base scoring, W only (no transport), 1 EM iteration,
    1 Sinkhorn iteration, the default, and the default in the other
    `sinkhorn_mode` (`sinkhorn_log` while the default is absorbed). WinCLIP+
    shape (3 scales): the same with 1 optax inner step instead of 1 EM
    iteration. Shares are derived by differences of the fastest repeats
    (`derive_profile`): machine load only ever adds time, so the minimum is the
    steadier basis for a difference.
    """
    b = s.profile_batch
    bank, queries = features(s.pc_n, s.pc_c, seed=1), features(b, s.pc_grid**2, s.pc_c, seed=2)
    default = RefineConfig()
    other = next(m for m in _MODES if m != default.sinkhorn_mode)
    pc = lambda **f: patchcore_config(s, s.pc_grid, **f)
    wc = lambda **f: winclip_refine_configs(s, **f)
    wc_inputs = winclip_inputs(s, b)

    def ablations(make, one_step: str, field: str) -> dict[str, Any]:
        # `one_step`: the shape's own loop cut to one pass (EM or optax).
        return {
            "base": make(use_refinement=False),
            "w_only": make(use_transport=False),
            one_step: make(**{field: 1}),
            "sinkhorn_1": make(sinkhorn_iters=1),
            "default": make(),
            f"sinkhorn_{other}": make(sinkhorn_mode=other),
        }

    variants = {
        "patchcore_shape": (
            refine_and_score,
            lambda cfg: (bank, queries, cfg),
            ablations(pc, "em_1", "num_iters"),
        ),
        "winclip_shape": (
            winclip_refine,
            lambda cfg: (*wc_inputs, cfg),
            ablations(wc, "inner_1", "inner_steps"),
        ),
    }
    out: dict[str, Any] = {"rows": []}
    for case, (fn, make_args, configs) in variants.items():
        cases = [Case("profile", case, k, b, fn, make_args(c)) for k, c in configs.items()]
        rows = measure(cases, s.repeats, s.warmup)
        out["rows"] += rows
        out[case] = derive_profile(
            {r["method"]: 1e3 * r["min_s"] / b for r in rows},
            default.num_iters,
            default.sinkhorn_iters,
            default.inner_steps,
            default.sinkhorn_mode,
        )
    return out


def derive_profile(
    ms: dict[str, float], em: int, sk: int, inner: int, mode: str = "absorbed"
) -> dict[str, float]:
    """Shares of the refined time from timings of ablated configs.

    With one Sinkhorn iteration both modes run the same program (a single
    log-domain iteration), so `sinkhorn_1` is the common basis: one log
    iteration costs `L = (log - sinkhorn_1) / (sk - 1)`, the log mode's
    Sinkhorn `sk * L`, the absorbed mode's `absorbed - sinkhorn_1 + L` (its
    first iteration is a log one, the `sk - 1` others kernel iterations).

    Args:
      ms: ms per query of `base`, `w_only`, `default` and some of `em_1`,
        `sinkhorn_1`, `inner_1`, `sinkhorn_log` / `sinkhorn_absorbed` (the
        default in the other Sinkhorn mode).
      em: EM iterations of the default.
      sk: Sinkhorn iterations per E-step of the default.
      inner: optax inner steps per M-step of the default.
      mode: `sinkhorn_mode` of the default.

    Returns:
      ms and percentages of the default's time: the base scoring, the
      least-squares init and refined scoring (`w_only - base`), the EM loop
      (`default - w_only`), all Sinkhorn iterations of the default
      (`sinkhorn_ms`; without the other mode's timing estimated as
      `(default - sinkhorn_1) * sk / (sk - 1)`, i.e. equal iterations), all
      optax inner steps, one EM iteration. With both modes timed also
      `sinkhorn_log_ms`, `sinkhorn_absorbed_ms`, their ratio
      `sinkhorn_log_over_absorbed` and the whole refinement in the other mode
      (`refined_<mode>_ms`).
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
    other = next(m for m in _MODES if m != mode)
    if "sinkhorn_1" in ms and f"sinkhorn_{other}" in ms:
        full = {mode: total, other: ms[f"sinkhorn_{other}"]}
        per_log = (full["log"] - ms["sinkhorn_1"]) / (sk - 1)
        out["sinkhorn_log_ms"] = sk * per_log
        out["sinkhorn_absorbed_ms"] = full["absorbed"] - ms["sinkhorn_1"] + per_log
        out["sinkhorn_ms"] = out[f"sinkhorn_{mode}_ms"]
        out[f"refined_{other}_ms"] = full[other]
    elif "sinkhorn_1" in ms:
        out["sinkhorn_ms"] = (total - ms["sinkhorn_1"]) * sk / (sk - 1)
    if "inner_1" in ms:
        out["optax_inner_steps_ms"] = (total - ms["inner_1"]) * inner / (inner - 1)
    for key in list(out):
        if key != "refined_ms":
            out[key.replace("_ms", "_pct")] = 100.0 * out[key] / total
    if "sinkhorn_log_ms" in out:
        out["sinkhorn_log_over_absorbed"] = out["sinkhorn_log_ms"] / out["sinkhorn_absorbed_ms"]
    return out


def device_counts(available: int, limit: int | None) -> list[int]:
    """Powers of two up to `min(available, limit)`, and that count itself."""
    top = min(available, limit or available)
    return sorted({2**i for i in range(int(math.log2(top)) + 1)} | {top})


def bench_sharding(s: BenchSettings) -> list[dict[str, Any]]:
    """Scaling of `refine_and_score` and `detect` over 1..N devices (batch sharded).

    Per device count: the compiled program on pre-placed inputs (pure compute)
    and `run_sharded` on host inputs (placement and output trim included), plus
    whether the outputs really are split over the devices and match 1 device.
    """
    counts = device_counts(jax.device_count(), s.devices)
    batch = -(-(s.sharding_batch or max(s.batch_sizes)) // counts[-1]) * counts[-1]
    bank = np.asarray(features(s.pc_n, s.pc_c, seed=1))
    queries = np.asarray(features(batch, s.pc_grid**2, s.pc_c, seed=2))
    host, dbank = detect_setup(s)
    ext = host.detector.extractor
    detect_args = (host.params, dbank, np.asarray(images(batch, s.image_size)))
    base_cfg = host.detector.config(precision=s.precision, use_refinement=False)
    detect = make_detect(ext.extract)
    fns = {  # (name, method): (function, arguments, batch argument)
        ("refine_and_score", "patchcore+"): (
            refine_and_score,
            (bank, queries, patchcore_config(s, s.pc_grid)),
            1,
        ),
        # PatchCore too: the refined / base ratio at each device count.
        (f"detect {ext.name}", "patchcore"): (detect, (*detect_args, base_cfg), 2),
        (f"detect {ext.name}", "patchcore+"): (
            detect,
            (*detect_args, host.detector.config(precision=s.precision)),
            2,
        ),
    }
    rows = []
    for (name, method), (fn, args, argnum) in fns.items():
        group = []
        for d in counts:
            mesh = batch_mesh(jax.devices()[:d])
            placed = [
                shard_batch(a, mesh) if i == argnum else replicate(a, mesh)
                for i, a in enumerate(args)
            ]
            case = Case("sharding", name, method, batch, fn, tuple(placed), {"devices": d})
            (row,) = measure([case], s.repeats, s.warmup)
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
    detector = PatchCore.create(s.precision_backbone, s.aggregation, s.image_size)
    host = BatchedDetector(detector, detector.load_params(s.precision_weights), batch_size=8)
    rows = []
    with tempfile.TemporaryDirectory(prefix="protorefine_bench_") as tmp:
        root = make_synthetic_dataset(
            tmp, s.precision_categories, *s.precision_counts, image_size=256, seed=0
        )
        for category in s.precision_categories:
            data = load_dataset_category("folder", root, category, host.image_size)
            test = runner.load_test_set(data, host)
            support = sample_support(data.train_good, s.shots, s.precision_seed, root=data.root)
            support_features = host.features(data.load_images(support.paths))
            host.alpha = s.alpha  # the bench's coreset ratio
            # Through the host: it keeps the support features, which the tf32 and
            # bfloat16 configs recalibrate from (`BatchedDetector.calibrated_state`).
            state = host.fit(support_features)
            for name in ("patchcore", "patchcore+"):
                method = get_method(name)
                results = {}
                for precision in ("float32", "tf32", "bfloat16"):
                    fields = runner.refine_fields(runner.Settings(precision=precision))
                    cfg = host.config(fields, method)
                    results[precision] = host.score(state, test["features"], method, cfg, {})
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
                            "bank_size": bank_size(state),
                        }
                    )
                    print(
                        f"[precision] {category} {name} {precision}: "
                        f"rel image diff {d_img / score_range:.2e}, "
                        f"image AUROC {metrics['image_auroc']:.2f}",
                        flush=True,
                    )
    return {"features": host.describe(), "shots": s.shots, "rows": rows}
