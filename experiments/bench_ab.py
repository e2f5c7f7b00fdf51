"""Interleaved before/after timing of end-to-end `detect` across two checkouts.

`experiments.bench` compares methods within one code base. To compare a
change against the code before it under the same machine load, this script
imports a second checkout's `protorefine_jax` under another package name
(`protorefine_before`: a temporary copy with its imports renamed) and times,
in one process with the calls interleaved, PatchCore (this checkout),
PatchCore+ before and PatchCore+ after (plus optional `EMxSinkhorn`
iteration variants of this checkout). BENCHMARKS.md, issue 15 second pass.

    git worktree add /tmp/before <commit>
    python -m experiments.bench_ab --before_tree=/tmp/before \
        --backbone=efficientnet_lite0 --aggregation=simple --batch_sizes=1,8 --repeats=10

Random weights and images (cost does not depend on the values).
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from protorefine_jax.detectors import PatchCore
from protorefine_jax.pipeline import make_detect

FLAGS = flags.FLAGS

PACKAGE = "protorefine_before"


def import_before(tree: Path):
    """The checkout's `protorefine_jax`, importable as `protorefine_before`."""
    source = tree / "protorefine_jax"
    if not (source / "__init__.py").is_file():
        raise FileNotFoundError(f"{source} is not a protorefine_jax package; pass a checkout.")
    root = Path(tempfile.mkdtemp(prefix="bench_ab_"))
    shutil.copytree(source, root / PACKAGE)
    for path in (root / PACKAGE).rglob("*.py"):
        path.write_text(re.sub(r"\bprotorefine_jax\b", PACKAGE, path.read_text()))
    sys.path.insert(0, str(root))
    pipeline = importlib.import_module(f"{PACKAGE}.pipeline")
    return pipeline, importlib.import_module(f"{PACKAGE}.detectors")


def main(argv):
    """Prints ms per image (median, fastest) and the ratios to PatchCore."""
    del argv
    if not FLAGS.before_tree:
        raise app.UsageError("--before_tree is required (a checkout of the 'before' commit).")
    pipeline_b, detectors_b = import_before(Path(FLAGS.before_tree))
    det = PatchCore.create(FLAGS.backbone, FLAGS.aggregation, 256)
    params = det.load_params("random")
    rng = np.random.default_rng(3)
    support = jnp.asarray(rng.random((2, 256, 256, 3), np.float32))
    bank = det.fit_features(det.features(params, support), alpha=0.05).banks[0].prototypes
    old_det = detectors_b.PatchCore.create(FLAGS.backbone, FLAGS.aggregation, 256)
    new, old = make_detect(det.extractor.extract), pipeline_b.make_detect(old_det.extractor.extract)
    cases = {
        "patchcore": (new, det.config(use_refinement=False)),
        "patchcore+ before": (old, old_det.config()),
        "patchcore+ after": (new, det.config()),
    }
    for variant in FLAGS.variants:
        em, sk = map(int, variant.lower().split("x"))
        cases[f"patchcore+ after {variant}"] = (new, det.config(num_iters=em, sinkhorn_iters=sk))
    print(f"load average {os.getloadavg()}", flush=True)
    for b in map(int, FLAGS.batch_sizes):
        images = jnp.asarray(rng.random((b, 256, 256, 3), np.float32))
        for fn, cfg in cases.values():  # compile, then one warm-up call
            for _ in range(2):
                jax.block_until_ready(fn(params, bank, images, cfg))
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(FLAGS.repeats):
            for name, (fn, cfg) in cases.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(params, bank, images, cfg))
                times[name].append((time.perf_counter() - t0) / b * 1e3)
        base = np.median(times["patchcore"]), np.min(times["patchcore"])
        for name, t in times.items():
            med, low = np.median(t), np.min(t)
            print(
                f"{FLAGS.backbone} batch {b} {name:26s} median {med:8.2f} min {low:8.2f} "
                f"ms/img  ratio {med / base[0]:5.2f} / {low / base[1]:5.2f}",
                flush=True,
            )
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    # Flags only when run as a script: the module is imported by tests next
    # to the eval, whose flag names (backbone, batch_sizes) it shares.
    flags.DEFINE_string("before_tree", None, "Checkout whose protorefine_jax is 'before'.")
    flags.DEFINE_string("backbone", "efficientnet_lite0", "Backbone.")
    flags.DEFINE_enum("aggregation", "simple", ["official", "simple"], "Aggregation.")
    flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes.")
    flags.DEFINE_integer("repeats", 10, "Timed calls per case (interleaved).")
    flags.DEFINE_list("variants", [], "Extra PatchCore+ iteration counts, EMxSinkhorn.")
    app.run(main)
