"""Throughput of each backbone's jitted ``extract`` (lower / compile / steady state).

Launch (CPU, all backbones, both aggregations, batch 8 at 256 px)::

    python -m experiments.tools.bench_extract --batch 8 --image_size 256 --repeats 5 \
        --out /tmp/bench_extract.json

Random weights (``init_params``): throughput does not depend on the values.
Prints one JSON record per configuration and writes the list to ``--out``.
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
from absl import app, flags

from protorefine_jax.features import BACKBONES, get_extractor

_BACKBONES = flags.DEFINE_list("backbones", list(BACKBONES), "backbones to time")
_AGGREGATIONS = flags.DEFINE_list("aggregations", ["official", "simple"], "aggregations")
_BATCH = flags.DEFINE_integer("batch", 8, "images per call")
_SIZE = flags.DEFINE_integer("image_size", 256, "input side")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed calls after one warm-up")
_OUT = flags.DEFINE_string("out", None, "optional JSON output path")


def bench(name: str, aggregation: str, batch: int, size: int, repeats: int) -> dict:
    """Times lowering, compilation and steady-state calls of one extractor."""
    ext = get_extractor(name, aggregation, size)
    params = ext.init_params(jax.random.key(0))
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    images = jax.device_put(images)

    t0 = time.perf_counter()
    lowered = ext.extract.lower(params, images)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    jax.block_until_ready(compiled(params, images))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, images))
        times.append(time.perf_counter() - start)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    median = float(np.median(times))
    return {
        "backbone": name,
        "aggregation": aggregation,
        "batch": batch,
        "image_size": size,
        "feature_shape": [batch, ext.grid[0] * ext.grid[1], ext.feature_dim],
        "lower_s": round(t1 - t0, 3),
        "compile_s": round(t2 - t1, 3),
        "step_median_s": round(median, 4),
        "step_min_s": round(min(times), 4),
        "images_per_s": round(batch / median, 2),
        "gflops_per_image": round(float(cost.get("flops", float("nan"))) / batch / 1e9, 3),
        "device": str(jax.devices()[0]),
    }


def main(argv):
    """Runs every requested configuration and prints / writes the records."""
    del argv
    records = []
    for name in _BACKBONES.value:
        for aggregation in _AGGREGATIONS.value:
            rec = bench(name, aggregation, _BATCH.value, _SIZE.value, _REPEATS.value)
            print(json.dumps(rec), flush=True)
            records.append(rec)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    app.run(main)
