"""Few-shot protocol: seeded support sets and aggregation over seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from protorefine_jax import data

POOL = [Path("/ds/cat/train/good") / f"{i:03d}.png" for i in range(12)]


def test_deterministic_and_order_independent():
    a = data.sample_support(POOL, 3, seed=7)
    b = data.sample_support(list(reversed(POOL)), 3, seed=7)
    assert a == b
    assert len(set(a.paths)) == 3 and a.k == 3 and a.seed == 7
    assert a.names == tuple(p.name for p in a.paths)
    # Pinned draw: guards against a silent change of the sampling scheme.
    order = np.random.default_rng(7).permutation(12)[:3]
    assert a.paths == tuple(POOL[i] for i in order)


def test_seeds_differ_and_shots_nest():
    sets = data.support_sets(POOL, 4, seeds=data.DEFAULT_SEEDS, root="/ds/cat")
    assert [s.seed for s in sets] == [0, 1, 2, 3, 4]
    assert len({s.paths for s in sets}) == 5
    assert sets[0].names[0].startswith("train/good/")
    for k in (1, 2, 3):
        assert data.sample_support(POOL, k, 3).paths == sets[3].paths[:k]


def test_errors():
    with pytest.raises(
        data.NotEnoughShotsError, match=r"Asked for 13 shots but only 12 .*Fix: use k <= 12"
    ):
        data.sample_support(POOL, 13, 0)
    with pytest.raises(data.EmptyTrainSetError, match="support pool is empty"):
        data.sample_support([], 1, 0)
    with pytest.raises(ValueError, match="k \\(shots\\) must be >= 1"):
        data.sample_support(POOL, 0, 0)


def test_mean_std_and_aggregate():
    vals = [80.0, 82.0, 90.0]
    mean, std = data.mean_std(vals)
    np.testing.assert_allclose([mean, std], [np.mean(vals), np.std(vals)], rtol=1e-12)
    np.testing.assert_allclose(data.mean_std(vals, ddof=1)[1], np.std(vals, ddof=1), rtol=1e-12)
    assert data.mean_std([5.0]) == (5.0, 0.0)
    agg = data.aggregate_seeds([{"auroc": 1.0, "f1": 2.0}, {"auroc": 3.0, "f1": 2.0}])
    assert agg == {"auroc": (2.0, 1.0), "f1": (2.0, 0.0)}
    with pytest.raises(ValueError, match="NaN"):
        data.mean_std([1.0, float("nan")])
    with pytest.raises(ValueError, match="keys"):
        data.aggregate_seeds([{"a": 1.0}, {"b": 1.0}])
    with pytest.raises(ValueError, match="at least one"):
        data.mean_std([])
