"""The paired speed sections of `experiments.bench`: extract, refine, detect, winclip.

Each section returns timed rows (`bench_lib.measure`): base and refined
calls of the same shape and batch are measured together, interleaved, so
`bench_report.ratios` can pair them. The inputs and configs here are shared
with `bench_analyses` (profile, sharding). Random weights and features
throughout: the cost does not depend on their values.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from experiments.bench_lib import Case, measure, measure_api
from experiments.bench_settings import BenchSettings
from protorefine_jax import RefineConfig, make_detect, refine_and_score
from protorefine_jax.app.batching import BatchedDetector
from protorefine_jax.detectors import PatchCore

# --------------------------------------------------------------------------- inputs


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def images(batch: int, size: int, seed: int = 0) -> jax.Array:
    """Random uint8 RGB images `[batch, size, size, 3]` on the device."""
    return jax.device_put(_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8))


def features(*shape: int, seed: int = 0) -> jax.Array:
    """Random positive float32 features of `shape` on the device."""
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
    """Per-scale WinCLIP(+) refinement configs: `winclip_config`'s defaults at each grid."""
    from protorefine_jax.clip.winclip import winclip_config  # imports transformers

    refine = winclip_config(precision=s.precision, **fields).refine
    return tuple(refine.replace(grid_shape=g, image_size=None) for g in winclip_grids(s.wc_grid))


def winclip_refine(banks, queries, configs):
    """`refine_and_score` over the three WinCLIP+ scales (one program)."""
    return tuple(refine_and_score(b, q, c) for b, q, c in zip(banks, queries, configs, strict=True))


def winclip_alpha(s: BenchSettings) -> float:
    """`--wc_alpha`, else WinCLIP+'s coreset ratio for MVTec (the detector's default)."""
    if s.wc_alpha is not None:
        return s.wc_alpha
    from protorefine_jax.detectors.winclip import default_alpha  # imports transformers

    return default_alpha("mvtec")


def winclip_inputs(s: BenchSettings, batch: int) -> tuple[tuple, tuple]:
    """Random per-scale banks `[n_s, c]` and queries `[B, m_s, c]`."""
    banks, queries = [], []
    for i, (h, w) in enumerate(winclip_grids(s.wc_grid)):
        n = max(1, math.floor(winclip_alpha(s) * s.shots * h * w))
        banks.append(features(n, s.wc_c, seed=10 + i))
        queries.append(features(batch, h * w, s.wc_c, seed=20 + i))
    return tuple(banks), tuple(queries)


def random_host(name: str, aggregation: str, image_size: int) -> BatchedDetector:
    """The eval's PatchCore host with random backbone weights (`init_params(PRNGKey(0))`)."""
    detector = PatchCore.create(name, aggregation, image_size)
    return BatchedDetector(detector, detector.load_params("random"), batch_size=1)


def detect_setup(s: BenchSettings) -> tuple[BatchedDetector, jax.Array]:
    """`--detect_backbone` host with random weights and a k-shot coreset bank `[n, c]`."""
    host = random_host(s.detect_backbone, s.aggregation, s.image_size)
    support = host.detector.features(host.params, images(s.shots, s.image_size, seed=3))
    return host, host.detector.fit_features(support, alpha=s.alpha).banks[0].prototypes


def backbone_case(name: str, aggregation: str) -> str:
    """Case name of a backbone: its name, plus the aggregation unless official."""
    return name if aggregation == "official" else f"{name} ({aggregation})"


# --------------------------------------------------------------------------- sections


def bench_extract(s: BenchSettings) -> list[dict[str, Any]]:
    """Feature extraction per backbone, aggregation and batch size."""
    rows = []
    for name in s.backbones:
        for aggregation in s.extract_aggregations:
            host = random_host(name, aggregation, s.image_size)
            ext = host.detector.extractor
            info = {
                "shape": f"{s.image_size}px -> [{ext.grid[0] * ext.grid[1]}, {ext.feature_dim}]"
            }
            for b in s.batch_sizes:
                args = (host.params, images(b, s.image_size))
                case = backbone_case(name, aggregation)
                case = Case("extract", case, "extract", b, ext.extract, args, info)
                rows += measure([case], s.repeats, s.warmup)
    return rows


def bench_refine(s: BenchSettings) -> list[dict[str, Any]]:
    """`refine_and_score` alone: PatchCore+ and WinCLIP+ shapes, base vs refined."""
    rows = []
    m = s.pc_grid**2
    bank = features(s.pc_n, s.pc_c, seed=1)
    pc_shape = f"m={m}, n={s.pc_n}, c={s.pc_c}"
    wc_shape = "m=" + "/".join(str(h * w) for h, w in winclip_grids(s.wc_grid))
    wc_shape += f", n=alpha*k*m, c={s.wc_c}"
    for b in s.batch_sizes:
        queries = features(b, m, s.pc_c, seed=2)
        cases = [
            Case("refine", "patchcore_shape", method, b, refine_and_score, (bank, queries, cfg))
            for method, cfg in (
                ("patchcore", patchcore_config(s, s.pc_grid, use_refinement=False)),
                ("patchcore+", patchcore_config(s, s.pc_grid)),
            )
        ]
        rows += measure([c._replace(info={"shape": pc_shape}) for c in cases], s.repeats, s.warmup)
        api_args = (bank, queries, cases[1].args[2])
        rows.append(measure_api(rows[-1], refine_and_score, api_args, s.repeats, s.warmup))
        banks, wq = winclip_inputs(s, b)
        cases = [
            Case("refine", "winclip_shape", method, b, winclip_refine, (banks, wq, cfgs))
            for method, cfgs in (
                ("winclip", winclip_refine_configs(s, use_refinement=False)),
                ("winclip+", winclip_refine_configs(s)),
            )
        ]
        rows += measure([c._replace(info={"shape": wc_shape}) for c in cases], s.repeats, s.warmup)
    return rows


def bench_detect(s: BenchSettings) -> list[dict[str, Any]]:
    """End-to-end `make_detect(extract)`: PatchCore vs PatchCore+ (shipped defaults)."""
    host, bank = detect_setup(s)
    ext = host.detector.extractor
    detect = make_detect(ext.extract)
    case = backbone_case(ext.name, s.aggregation)
    info = {
        "shape": f"{ext.name} {s.image_size}px, m={ext.grid[0] * ext.grid[1]}, n={bank.shape[0]}, "
        f"c={ext.feature_dim}"
    }
    rows = []
    for b in s.batch_sizes:
        batch = images(b, s.image_size)
        cases = [
            Case("detect", case, method, b, detect, (host.params, bank, batch, cfg), info)
            for method, cfg in (
                ("patchcore", host.detector.config(precision=s.precision, use_refinement=False)),
                ("patchcore+", host.detector.config(precision=s.precision)),
            )
        ]
        rows += measure(cases, s.repeats, s.warmup)
    return rows


def clip_spec(name: str):
    """A CLIP preset by name, or `"tiny"`: the same program structure at toy widths."""
    from protorefine_jax.clip import PRESETS, ClipSpec

    if name == "tiny":  # for the test suite
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
    """End-to-end WinCLIP vs WinCLIP+ `detect` (random-init CLIP, k-shot banks).

    Per batch, interleaved: the multi-scale CLIP features alone
    (`extract_multiscale`, method `extract`: image tower plus the window
    passes), WinCLIP `detect` and WinCLIP+ `detect`. The class text features
    are random `[2, E]` rows (computed once per category in a real run).
    """
    from protorefine_jax.clip import build_banks, extract_multiscale, random_params, winclip_config
    from protorefine_jax.clip import detect as clip_detect
    from protorefine_jax.clip.winclip import scale_features

    spec = clip_spec(s.clip_model)
    params = random_params(spec)
    size = spec.image_size
    base_cfg = winclip_config(use_refinement=False, clip=spec, precision=s.precision)
    plus_cfg = winclip_config(use_refinement=True, clip=spec, precision=s.precision)
    support = extract_multiscale(params, images(s.shots, size, seed=3), plus_cfg)
    # WinClipBanks: WinCLIP scores against every support row, WinCLIP+ refines the coresets.
    banks = build_banks(support, winclip_alpha(s))
    text = jax.device_put(_rng(4).standard_normal((2, spec.embed_dim)).astype(np.float32))
    info = {
        "shape": f"{s.clip_model} {size}px, n="
        + "/".join(str(b.prototypes.shape[0]) for b in banks)
        + " (WinCLIP: "
        + "/".join(str(f.shape[0]) for f in banks.full)
        + "), c="
        + "/".join(str(f.shape[1]) for f in banks.full)
    }
    scales = "/".join(str(x.shape[1]) for x in scale_features(support))
    extract_info = {"shape": f"{size}px -> m={scales}, c={support.patches.shape[2]}"}
    rows = []
    for b in s.winclip_batch_sizes:
        batch = images(b, size)
        args = (params, batch, plus_cfg)
        cases = [
            Case("winclip", s.clip_model, "extract", b, extract_multiscale, args, extract_info)
        ]
        cases += [
            Case("winclip", s.clip_model, m, b, clip_detect, (params, banks, text, batch, c), info)
            for m, c in (("winclip", base_cfg), ("winclip+", plus_cfg))
        ]
        rows += measure(cases, s.repeats, s.warmup)
    return rows
