"""Property-based fuzz of the public API (issue 13, "Add").

Finite inputs inside the documented ranges never give NaN or infinite
outputs; invalid settings raise an error that names the field and the range.
The default suite runs `FUZZ_EXAMPLES` random scoring cases (each a new shape
or static config may compile: about a minute on 2 CPU cores) and
`CONFIG_EXAMPLES` config cases; `PROTOREFINE_FUZZ_EXAMPLES` raises the first.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protorefine_jax import RefineConfig, online_refine_and_score, refine_and_score
from protorefine_jax.config import RANGES

FUZZ_EXAMPLES = int(os.environ.get("PROTOREFINE_FUZZ_EXAMPLES", "20"))
CONFIG_EXAMPLES = 100


def log_uniform(lo, hi):
    return st.floats(math.log10(lo), math.log10(hi)).map(lambda e: 10.0**e)


@st.composite
def cases(draw):
    distance = draw(st.sampled_from(["sqeuclidean", "cosine"]))
    m_step = "optax" if distance == "cosine" else draw(st.sampled_from(["closed_form", "optax"]))
    fields = dict(
        distance=distance,
        m_step=m_step,
        optimizer=draw(st.sampled_from(["sgd", "preconditioned"])),
        inner_steps=draw(st.integers(1, 3)),
        num_iters=draw(st.integers(1, 3)),
        sinkhorn_iters=draw(st.sampled_from([1, 5, 30])),
        sinkhorn_mode=draw(st.sampled_from(["log", "absorbed"])),
        warm_start=draw(st.booleans()),
        use_transport=draw(st.booleans()),
        use_refinement=draw(st.booleans()),
        bank=draw(st.sampled_from(["refined", "union"])),
        precision=draw(st.sampled_from(["float32", "bfloat16"])),
        lam=draw(st.one_of(st.just(0.0), log_uniform(1e-3, 1e6))),
        epsilon=draw(log_uniform(RANGES["epsilon"][0], RANGES["epsilon"][2])),
        ridge=draw(log_uniform(RANGES["ridge"][0], RANGES["ridge"][2])),
        ridge_wide=draw(log_uniform(RANGES["ridge_wide"][0], RANGES["ridge_wide"][2])),
        lr=draw(st.floats(1e-3, 2.0)),
        image_size=draw(st.sampled_from([None, (8, 8)])),
    )
    c = draw(st.sampled_from([4, 12]))
    n = draw(st.sampled_from([3, 16]))
    h, w = draw(st.sampled_from([(3, 3), (2, 4)]))
    fields["grid_shape"] = (h, w)
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    # Largest |x| inside feature_range (cosine: any finite scale).
    lo, hi = (1e-14, 1e14) if distance == "sqeuclidean" else (1e-35, 1e35)
    scale = draw(log_uniform(lo, hi))
    bank = rng.normal(size=(n, c))
    queries = rng.normal(size=(2, h * w, c))
    kinds = ["normal", "duplicates", "lowrank", "query_in_bank", "zero_row", "reproduced"]
    kind = draw(st.sampled_from(kinds))
    if kind == "duplicates":
        bank[1:] = bank[0]
    elif kind == "lowrank":
        bank = rng.normal(size=(n, 1)) @ rng.normal(size=(1, c))
    elif kind == "query_in_bank":
        queries[0, : min(n, h * w)] = bank[: min(n, h * w)]
    elif kind == "zero_row":
        bank[0] = 0.0
    elif kind == "reproduced":
        # Identical bank rows and a whole query within 1e-4 of them: every cost is
        # zero or a rounding step (the case that once gave NaN, see test_refine.py).
        bank[1:] = bank[0]
        queries[:] = bank[0] * (1.0 + 1e-4 * rng.normal(size=queries.shape))
    peak = max(np.abs(bank).max(), np.abs(queries).max())
    bank, queries = bank / peak * scale, queries / peak * scale
    dtype = np.float32
    if 1e-3 <= scale <= 1e3 and draw(st.booleans()):
        dtype = np.float16
    online = None
    if fields["use_refinement"] and draw(st.booleans()):
        cap = draw(st.sampled_from([4, 16]))
        online = dict(capacity=cap, add_per_query=draw(st.integers(1, min(cap, h * w))))
    return fields, bank.astype(dtype), queries.astype(dtype), online, kind


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
@given(cases())
def test_finite_inputs_in_range_give_finite_outputs(case):
    fields, bank, queries, online, _ = case
    cfg = RefineConfig(**fields)
    if online is None:
        out = refine_and_score(bank, queries, cfg)
    else:
        out = online_refine_and_score(bank, queries, cfg, **online)
    assert np.asarray(out.inputs_ok).all()
    for leaf in jax.tree.leaves(out):
        arr = np.asarray(leaf)
        assert np.isfinite(arr).all(), (fields, online, arr)
    assert (np.asarray(out.patch_scores) >= 0).all()


BAD_VALUES = st.sampled_from(
    [float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 1e-30, 1e30, "0.1", True]
)


@settings(max_examples=CONFIG_EXAMPLES, deadline=None, derandomize=True)
@given(
    st.sampled_from(sorted(RANGES)),
    BAD_VALUES,
    st.sampled_from([float, np.float32, np.float64, np.asarray]),
)
def test_invalid_traced_fields_name_the_field_and_the_range(name, value, wrap):
    low, inclusive, high = RANGES[name]
    if isinstance(value, str | bool):
        wrapped = value
    else:
        ok = math.isfinite(value) and (value >= low if inclusive else value > low) and value <= high
        if ok:
            return  # a valid value (e.g. lam = 0): nothing to refuse
        wrapped = wrap(value)
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        RefineConfig(**{name: wrapped})


def test_float64_needs_x64_with_a_clear_error():
    with pytest.raises(ValueError, match="jax_enable_x64"):
        RefineConfig(precision="float64")
