import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from protorefine_jax import calibration as cal
from protorefine_jax import stream_calibration as sc


def support_scores(rng, n=60):
    return rng.gamma(2.0, size=n), rng.gamma(3.0, 0.5, size=n)


def stream(rng, t=12, m=16, shift=0.0):
    return rng.gamma(2.0, size=(t, m)) + shift, rng.gamma(3.0, 0.5, size=(t, m)) + shift


def quantile(x, q):
    """Float64 linear-interpolation quantile of the sorted sample (written out)."""
    s = sorted(float(v) for v in np.ravel(x))
    pos = q * (len(s) - 1)
    lo = int(np.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


def median_iqr(x):
    return quantile(x, 0.5), quantile(x, 0.75) - quantile(x, 0.25)


def as_floats(c):
    return [float(v) for v in c]


# ----------------------------------------------------------------------------- warm-up


def test_before_warmup_the_calibration_is_the_support_statistics_exactly():
    rng = np.random.default_rng(0)
    sh, sr = support_scores(rng)
    hosts, refs = stream(rng, t=6, shift=50.0)  # would move every statistic
    config = sc.StreamConfig(warmup=3, capacity=1000, support_weight=0.5, seed=1)
    want = as_floats(cal.statistics(sh, sr))
    state = sc.init(sh, sr, config)
    for t in range(6):
        got = as_floats(sc.current(state))
        if t < 3:
            assert got == want  # bit for bit
        else:
            assert got[0] > want[0] and got[2] > want[2]  # the shifted stream counts now
        state = sc.update(state, hosts[t], refs[t])

    _, calibrations = sc.calibrate_stream(sh, sr, hosts, refs, config)
    assert [as_floats(c) for c in calibrations[:3]] == [want] * 3
    assert as_floats(calibrations[3]) != want


def test_fused_scores_are_calibration_fuse_of_the_calibration_of_the_past():
    rng = np.random.default_rng(1)
    sh, sr = support_scores(rng)
    hosts, refs = stream(rng, t=8, m=12, shift=0.3)
    config = sc.StreamConfig(warmup=2, capacity=40, support_weight=0.3, seed=5)
    fused, calibrations = sc.calibrate_stream(sh, sr, hosts, refs, config)
    assert fused.shape == (8, 12) and fused.dtype == np.float32
    assert len(calibrations) == 8
    state = sc.init(sh, sr, config)
    for t in range(8):
        c = sc.current(state)
        assert as_floats(c) == as_floats(calibrations[t])
        want = cal.fuse(jnp.asarray(hosts[t]), jnp.asarray(refs[t]), c)
        np.testing.assert_allclose(fused[t], np.asarray(want), rtol=1e-6, atol=1e-6)
        state = sc.update(state, hosts[t], refs[t])


# -------------------------------------------------------------------------- look-ahead


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data_seed=st.integers(0, 2**16),
    t_total=st.integers(2, 6),
    m=st.integers(1, 6),
    cut=st.integers(1, 5),
    warmup=st.integers(0, 2),
    capacity=st.integers(1, 12),
    weight=st.sampled_from([0.0, 0.2, 0.5, 0.9]),
)
def test_later_images_never_change_earlier_scores(
    data_seed, t_total, m, cut, warmup, capacity, weight
):
    cut = min(cut, t_total - 1)
    rng = np.random.default_rng(data_seed)
    sh, sr = support_scores(rng, n=10)
    hosts, refs = stream(rng, t=t_total, m=m)
    other_h, other_r = hosts.copy(), refs.copy()
    other_h[cut:] = rng.normal(20.0, 5.0, size=other_h[cut:].shape)
    other_r[cut:] = rng.uniform(-3.0, 9.0, size=other_r[cut:].shape)
    config = sc.StreamConfig(warmup=warmup, capacity=capacity, support_weight=weight, seed=3)
    fused, cals = sc.calibrate_stream(sh, sr, hosts, refs, config)
    fused2, cals2 = sc.calibrate_stream(sh, sr, other_h, other_r, config)
    np.testing.assert_array_equal(fused[:cut], fused2[:cut])
    assert [as_floats(c) for c in cals[: cut + 1]] == [as_floats(c) for c in cals2[: cut + 1]]
    # Image `cut` itself is scored by the past only: its calibration is unchanged.


def test_look_ahead_check_can_fail_when_the_image_is_its_own_past():
    # A sanity check of the property above: had image t been scored after its
    # own update, changing it would change its score.
    rng = np.random.default_rng(2)
    sh, sr = support_scores(rng, n=10)
    hosts, refs = stream(rng, t=3, m=8)
    config = sc.StreamConfig(warmup=0, capacity=100, support_weight=0.2)
    a = sc.current(sc.update(sc.init(sh, sr, config), hosts[0], refs[0]))
    b = sc.current(sc.update(sc.init(sh, sr, config), hosts[0] + 5.0, refs[0]))
    assert as_floats(a) != as_floats(b)


# ---------------------------------------------------------------------- pooled reference


@pytest.mark.parametrize("images", [2, 5, 9])
def test_with_everything_kept_current_is_median_iqr_of_support_and_stream(images):
    rng = np.random.default_rng(10 + images)
    sh, sr = support_scores(rng, n=37)
    hosts, refs = stream(rng, t=images, m=11, shift=0.7)
    seen = images * 11
    # The support makes up exactly its share of everything: nothing is subsampled.
    config = sc.StreamConfig(
        warmup=2, capacity=seen + 5, support_weight=37 / (37 + seen), seed=images
    )
    state = sc.init(sh, sr, config)
    for t in range(images):
        state = sc.update(state, hosts[t], refs[t])
    got = as_floats(sc.current(state))[:4]  # the statistics (refined_on stays 1)
    want_h = median_iqr(np.concatenate([sh, hosts.ravel()]))
    want_r = median_iqr(np.concatenate([sr, refs.ravel()]))
    np.testing.assert_allclose(got, [*want_h, *want_r], rtol=2e-6)


def test_weight_one_keeps_the_support_and_weight_zero_uses_the_stream_alone():
    rng = np.random.default_rng(3)
    sh, sr = support_scores(rng, n=40)
    hosts, refs = stream(rng, t=6, m=10, shift=2.0)

    def after_all(weight):
        state = sc.init(sh, sr, sc.StreamConfig(warmup=1, capacity=500, support_weight=weight))
        for t in range(6):
            state = sc.update(state, hosts[t], refs[t])
        return as_floats(sc.current(state))[:4]

    np.testing.assert_allclose(after_all(1.0), [*median_iqr(sh), *median_iqr(sr)], rtol=2e-6)
    np.testing.assert_allclose(after_all(0.0), [*median_iqr(hosts), *median_iqr(refs)], rtol=2e-6)


@pytest.mark.parametrize(
    "support, stream_n, weight, want",
    [
        (100, 1000, 0.25, (100, 300)),  # support limits: the stream is subsampled
        (100, 30, 0.5, (30, 30)),  # the stream limits: the support is subsampled
        (100, 0, 0.5, (100, 0)),  # nothing seen yet: the support alone
        (100, 50, 1.0, (100, 0)),
        (100, 50, 0.0, (0, 50)),
    ],
)
def test_pool_sizes_keep_the_support_weight(support, stream_n, weight, want):
    assert sc._pool_sizes(support, stream_n, weight) == want


def test_pool_holds_support_and_stream_patches_in_proportion():
    rng = np.random.default_rng(4)
    sh, sr = np.zeros(100), np.zeros(100) - 1.0  # support patches: 0 / -1
    config = sc.StreamConfig(warmup=0, capacity=600, support_weight=0.25, seed=2)
    state = sc.init(sh, sr, config)
    for _ in range(10):
        v = rng.uniform(1.0, 2.0, size=50)  # stream patches: >= 1
        state = sc.update(state, v, v + 10.0)
    host, refined = sc.pool(state)
    assert (host == 0).sum() == 100 and (host >= 1).sum() == 300
    # One subsample of patches: the halves stay paired.
    np.testing.assert_array_equal(refined[host >= 1], host[host >= 1] + 10.0)
    # Deterministic given the seed.
    np.testing.assert_array_equal(sc.pool(state)[0], host)


# ------------------------------------------------------------------------------ memory


def test_the_reservoir_never_exceeds_its_capacity():
    rng = np.random.default_rng(5)
    sh, sr = support_scores(rng, n=20)
    config = sc.StreamConfig(warmup=0, capacity=50, support_weight=0.5)
    state = sc.init(sh, sr, config)
    offered = set()
    total = 0
    for _ in range(300):
        m = int(rng.integers(1, 30))
        v = rng.random(m) + total  # distinct values, to trace where entries came from
        total += m
        offered.update(v.tolist())
        state = sc.update(state, v, -v)
        assert state.host_reservoir.shape == (50,) and state.refined_reservoir.shape == (50,)
        assert state.filled == min(total, 50)
        host, refined = sc.pool(state)
        assert host.size <= 20 + 50 and refined.size == host.size
    assert state.seen == total and state.images == 300
    assert set(state.host_reservoir.tolist()) <= offered
    assert len(set(state.host_reservoir.tolist())) == 50  # no duplicates
    np.testing.assert_array_equal(state.refined_reservoir, -state.host_reservoir)


def test_update_returns_a_new_state_and_leaves_its_argument_alone():
    rng = np.random.default_rng(6)
    sh, sr = support_scores(rng, n=10)
    state = sc.init(sh, sr, sc.StreamConfig(capacity=8))
    for _ in range(3):
        state = sc.update(state, rng.random(5), rng.random(5))
    before = (state.host_reservoir.copy(), state.seen, state.images)
    new = sc.update(state, rng.random(5), rng.random(5))
    np.testing.assert_array_equal(state.host_reservoir, before[0])
    assert (state.seen, state.images) == before[1:]
    assert new.seen == state.seen + 5 and new.images == state.images + 1
    with pytest.raises(ValueError):
        state.host_reservoir[0] = 1.0  # read-only: the state is a value
    sh[0] = 1e9  # init copied the support scores
    assert state.support_host[0] != 1e9


# ------------------------------------------------------------------- reservoir sampling


def sequential_algorithm_r(seen, capacity, draws, old):
    """Vitter's algorithm R one item at a time (old reservoir entries are `old`)."""
    res = list(old)
    for i, j in enumerate(draws):
        p = seen + i
        if p < capacity:
            res[p] = p
        elif j < capacity:
            res[j] = p
    return res


def test_placements_are_algorithm_r_item_by_item():
    rng = np.random.default_rng(7)
    for _ in range(300):
        capacity = int(rng.integers(1, 12))
        seen = int(rng.integers(0, 30))
        m = int(rng.integers(1, 25))
        draws = np.array([rng.integers(0, seen + i + 1) for i in range(m)])
        old = [-1 - k for k in range(capacity)]
        want = sequential_algorithm_r(seen, capacity, draws, old)
        got = np.array(old)
        slots, items = sc._placements(seen, m, capacity, draws)
        assert len(np.unique(slots)) == len(slots)
        got[slots] = seen + items
        assert got.tolist() == want


def test_reservoir_sampling_is_roughly_uniform():
    capacity, m, images, runs = 100, 25, 40, 300
    n = m * images
    counts = np.zeros(n, np.int64)
    for seed in range(runs):
        state = sc.init(np.zeros(4), np.zeros(4), sc.StreamConfig(capacity=capacity, seed=seed))
        for t in range(images):
            ids = np.arange(t * m, (t + 1) * m, dtype=np.float64)
            state = sc.update(state, ids, ids)
        counts += np.bincount(state.host_reservoir.astype(np.int64), minlength=n)
    assert counts.sum() == capacity * runs
    # Every stream position is kept with probability capacity / n: equal counts
    # per tenth of the stream (early, late, ...).
    per_tenth = counts.reshape(10, -1).sum(axis=1)
    assert sps.chisquare(per_tenth).pvalue > 1e-3
    # And per position (expected 30 each): no position is never or always kept.
    assert 5 < counts.min() and counts.max() < 70
    # Sanity: a "keep the latest" buffer would fail the same check.
    latest = np.zeros(n, np.int64)
    latest[-capacity:] = runs
    assert sps.chisquare(latest.reshape(10, -1).sum(axis=1)).pvalue < 1e-3


# ------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"warmup": -1}, "warmup must be >= 0"),
        ({"warmup": 1.5}, "warmup must be an integer"),
        ({"warmup": True}, "warmup must be an integer"),
        ({"capacity": 0}, "capacity must be >= 1"),
        ({"capacity": "10"}, "capacity must be an integer"),
        ({"support_weight": -0.1}, "support_weight must be a number in"),
        ({"support_weight": 1.5}, "support_weight must be a number in"),
        ({"support_weight": float("nan")}, "support_weight must be a number in"),
        ({"support_weight": "0.5"}, "support_weight must be a number in"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"seed": 0.5}, "seed must be an integer"),
    ],
)
def test_bad_config_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sc.StreamConfig(**kwargs)


def test_good_config_values_and_defaults():
    c = sc.StreamConfig()
    assert (c.warmup, c.capacity, c.support_weight, c.seed) == (8, 65536, 0.5, 0)
    sc.StreamConfig(warmup=0, capacity=1, support_weight=0, seed=np.int64(3))
    sc.StreamConfig(support_weight=1)


def test_bad_scores_raise():
    ok = np.ones(5)
    with pytest.raises(ValueError, match="support_host must be a non-empty, finite"):
        sc.init(np.array([1.0, np.nan]), ok[:2])
    with pytest.raises(ValueError, match="support_refined must be a non-empty"):
        sc.init(ok, [])
    with pytest.raises(ValueError, match="same patches"):
        sc.init(ok, ok[:3])
    with pytest.raises(ValueError, match="StreamConfig"):
        sc.init(ok, ok, {"warmup": 1})
    state = sc.init(ok, ok)
    with pytest.raises(ValueError, match="host_patches must be a non-empty, finite"):
        sc.update(state, [np.inf, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="same patches"):
        sc.update(state, ok, ok[:2])
    with pytest.raises(ValueError, match=r"\[T, m\] patch scores of the same shape"):
        sc.calibrate_stream(ok, ok, np.ones((3, 4)), np.ones((3, 5)))
    with pytest.raises(ValueError, match="finite"):
        sc.calibrate_stream(ok, ok, np.full((3, 4), np.nan), np.ones((3, 4)))


def test_gate_keeps_images_judged_anomalous_out_of_the_statistics():
    rng = np.random.default_rng(3)
    sup_h, sup_r = rng.normal(size=(2, 400))
    cfg = sc.StreamConfig(warmup=1, capacity=10_000, support_weight=0.5, seed=0)
    normal = rng.normal(size=(2, 1, 50))
    defect = normal + 40.0  # far above any gate
    host = np.concatenate([normal[0], defect[0], normal[0]])
    refined = np.concatenate([normal[1], defect[1], normal[1]])
    _, gated = sc.calibrate_stream(sup_h, sup_r, host, refined, cfg, gate=5.0)
    _, open_ = sc.calibrate_stream(sup_h, sup_r, host, refined, cfg, gate=None)
    # Without the gate the defective image moves the third image's statistics.
    assert gated[2] != open_[2]
    # With it, the third image is calibrated as if the defect had never been seen.
    _, skipped = sc.calibrate_stream(sup_h, sup_r, host[[0, 2]], refined[[0, 2]], cfg, gate=5.0)
    np.testing.assert_allclose(np.asarray(gated[2]), np.asarray(skipped[1]))


def test_in_order_puts_each_images_calibration_back_in_place():
    rng = np.random.default_rng(7)
    sup_h, sup_r = rng.gamma(2.0, size=(2, 300))
    host, refined = rng.gamma(2.0, size=(2, 12, 20))
    order = rng.permutation(12)
    cfg = sc.StreamConfig(warmup=2)
    _, cals = sc.calibrate_stream(sup_h, sup_r, host[order], refined[order], cfg)
    stacked = sc.in_order(cals, order)
    assert np.shape(stacked.host_loc) == (12, 1)
    for t, i in enumerate(order):
        for got, want in zip(stacked, cals[t], strict=True):
            assert float(np.asarray(got)[i, 0]) == pytest.approx(float(want))
