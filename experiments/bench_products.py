"""Benchmark: the refinement's Gram form against its feature form, by bank size.

`RefineConfig.products` ("gram", "features"; "auto" picks the features once
`n > 2c`). For each bank size `n` this times one compiled PatchCore+ query
(`pipeline.score_query`, refined patch scores, `m` patches of `c` features,
random non-negative features of a Lite0-like scale) in both forms and prints
milliseconds per query and the largest relative difference of their patch
scores (the two forms round differently). The Gram form is skipped above
`--gram_max` rows (it costs ~`n^2` per patch and holds an `[n, n]` array).

    python -m experiments.bench_products
    python -m experiments.bench_products --rows=102,512,2048,10240 --gram_max=10240
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence

from absl import flags

FLAGS = flags.FlagValues()
flags.DEFINE_list(
    "rows", ["102", "304", "512", "2048", "10240"], "Bank sizes n.", flag_values=FLAGS
)
flags.DEFINE_integer("patches", 1024, "Query patches m.", flag_values=FLAGS)
flags.DEFINE_integer("dim", 152, "Feature dimension c (Lite0 simple: 152).", flag_values=FLAGS)
flags.DEFINE_integer(
    "repeats", 3, "Timed calls per form (the minimum is reported).", flag_values=FLAGS
)
flags.DEFINE_integer("gram_max", 4096, "Largest n timed in the Gram form.", flag_values=FLAGS)
flags.DEFINE_string("out", "", "Optional JSON output path.", flag_values=FLAGS)


def time_form(bank, query, products: str, repeats: int):
    """(min seconds per call, patch scores) of one compiled query in one form."""
    import jax
    import numpy as np

    from protorefine_jax import RefineConfig
    from protorefine_jax.pipeline import score_query

    cfg = RefineConfig(products=products, image_size=None)
    fn = jax.jit(lambda b, q: score_query(b, q, cfg).patch_scores)
    scores = np.asarray(fn(bank, query).block_until_ready())
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(bank, query).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return best, scores


def run(rows: Sequence[int], m: int, c: int, repeats: int, gram_max: int) -> list[dict]:
    """One row per bank size: ms per query in each form and their scores' difference."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    query = jnp.asarray(np.abs(rng.standard_normal((m, c))).astype(np.float32))
    out = []
    for n in rows:
        bank = jnp.asarray(np.abs(rng.standard_normal((n, c))).astype(np.float32))
        row: dict = {"n": n, "m": m, "c": c}
        feat_s, feat = time_form(bank, query, "features", repeats)
        row["features_ms"] = round(1e3 * feat_s, 2)
        if n <= gram_max:
            gram_s, gram = time_form(bank, query, "gram", repeats)
            row["gram_ms"] = round(1e3 * gram_s, 2)
            row["max_rel_diff"] = float(np.max(np.abs(feat - gram)) / np.max(np.abs(gram)))
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def main(argv: Sequence[str]) -> None:
    """Prints one JSON line per bank size, then a markdown table."""
    FLAGS(list(argv))
    rows = run(
        [int(r) for r in FLAGS.rows], FLAGS.patches, FLAGS.dim, FLAGS.repeats, FLAGS.gram_max
    )
    print("| n | Gram form ms / query | feature form ms / query | max relative difference |")
    print("|---|---|---|---|")
    for r in rows:
        gram = f"{r['gram_ms']:.1f}" if "gram_ms" in r else "not run"
        diff = f"{r['max_rel_diff']:.1e}" if "max_rel_diff" in r else "-"
        print(f"| {r['n']} | {gram} | {r['features_ms']:.1f} | {diff} |")
    if FLAGS.out:
        with open(FLAGS.out, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main(sys.argv)
