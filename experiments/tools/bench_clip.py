"""Time WinCLIP(+) feature extraction (and optionally detect) at the paper's CLIP shape.

Launch (CPU, ViT-B-16-plus-240 shape, random weights, batch 2, 240 px)::

    python -m experiments.tools.bench_clip --batch 2 --repeats 3 --out /tmp/bench_clip.json

Add ``--detect`` to also time the full jitted ``detect`` (features + zero-shot +
few-shot WinCLIP and WinCLIP+ scoring against 1-shot banks, alpha 0.5).
Random weights: the cost does not depend on the values. Lowering, compilation
and the steady state are timed separately (warm-up first, ``block_until_ready``,
median of repeats); XLA's ``cost_analysis`` gives the FLOPs. One JSON record
per measurement is printed and the list is written to ``--out``.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from protorefine_jax.clip import PRESETS, build_banks, detect, extract_multiscale, winclip_config
from protorefine_jax.clip.spec import random_params

_MODEL = flags.DEFINE_enum("model", "ViT-B-16-plus-240", list(PRESETS), "CLIP shape")
_BATCH = flags.DEFINE_integer("batch", 2, "images per call")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed calls after one warm-up")
_DETECT = flags.DEFINE_bool("detect", False, "also time detect (WinCLIP and WinCLIP+)")
_OUT = flags.DEFINE_string("out", None, "optional JSON output path")


def _time(fn, args, repeats: int) -> dict:
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {
        "lower_s": round(t1 - t0, 3),
        "compile_s": round(t2 - t1, 3),
        "step_median_s": round(float(np.median(times)), 4),
        "step_min_s": round(min(times), 4),
        "flops": float(cost.get("flops", float("nan"))) if cost else float("nan"),
    }


def main(argv):
    """Times extraction (and detect) and prints / writes the records."""
    del argv
    spec = PRESETS[_MODEL.value]
    batch, size = _BATCH.value, spec.image_size
    params = random_params(spec)
    images = np.random.default_rng(0).uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
    images = jax.device_put(images)
    base = {
        "model": _MODEL.value,
        "batch": batch,
        "image_size": size,
        "grid": list(spec.grid_size),
        "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
    }
    records = []

    def report(what: str, stats: dict) -> None:
        rec = dict(base, what=what, **stats)
        rec["s_per_image"] = round(stats["step_median_s"] / batch, 4)
        rec["gflops_per_image"] = round(stats["flops"] / batch / 1e9, 2)
        print(json.dumps(rec), flush=True)
        records.append(rec)

    config = winclip_config(use_refinement=True, clip=spec)
    stats = _time(extract_multiscale, (params, images, config), _REPEATS.value)
    report("extract_multiscale", stats)
    if _DETECT.value:
        support = extract_multiscale(params, images[:1], config)
        banks = tuple(b.prototypes for b in build_banks(support, 0.5))
        text = np.random.default_rng(1).standard_normal((2, spec.embed_dim))
        text = jnp.asarray(text, jnp.float32)
        for use in (False, True):
            cfg = winclip_config(use_refinement=use, clip=spec)
            stats = _time(detect, (params, banks, text, images, cfg), _REPEATS.value)
            report("detect_winclip+" if use else "detect_winclip", stats)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    app.run(main)
