"""Decision thresholds: conformal normal-only rule, F1-optimal rule, helpers."""

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_recall_curve

from protorefine_jax.threshold import (
    Threshold,
    conformal_rank,
    decision_rates,
    f1_threshold,
    normal_threshold,
)


@pytest.mark.parametrize(
    ("n", "rate", "rank", "bound"),
    [
        (2, 0.05, 2, 1 / 3),  # two support images: the max, bound 1/3
        (19, 0.05, 19, 0.05),  # exactly enough scores for 5 %
        (99, 0.05, 95, 0.05),
        (99, 0.1, 90, 0.1),
        (9, 0.5, 5, 0.5),
    ],
)
def test_conformal_rank_table(n, rate, rank, bound):
    r, b = conformal_rank(n, rate)
    assert r == rank
    assert b == pytest.approx(bound, abs=1e-12)
    assert b <= rate + 1e-12 or r == n


def test_the_bound_is_the_false_alarm_rate_of_exchangeable_scores():
    # Monte Carlo: draw n calibration scores and one new score i.i.d.; the rate
    # at which the new one exceeds the threshold must match the bound.
    rng = np.random.default_rng(0)
    trials = 40000
    for n, rate in [(2, 0.05), (9, 0.2), (19, 0.05)]:
        cal = rng.gamma(2.0, 1.0, size=(trials, n))
        new = rng.gamma(2.0, 1.0, size=trials)
        values = np.array([normal_threshold(c, rate).value for c in cal[:2000]])
        # The rule is an order statistic, so vectorise it for the full count.
        r, bound = conformal_rank(n, rate)
        np.testing.assert_allclose(values, np.sort(cal[:2000], axis=1)[:, r - 1], rtol=0, atol=0)
        observed = np.mean(new > np.sort(cal, axis=1)[:, r - 1])
        # Binomial std at 40000 trials is <= 0.0025: 4 sigma.
        assert abs(observed - bound) < 0.01, (n, rate, observed, bound)


def test_margin_and_fields():
    t = normal_threshold([1.0, 3.0, 2.0], false_alarm_rate=0.2, margin=0.1, source="leave_one_out")
    assert t.rank == 3 and t.num_scores == 3
    assert t.value == pytest.approx(3.3, rel=1e-12)
    assert t.guaranteed and t.kind == "normal_only" and t.false_alarm_bound == pytest.approx(0.25)
    assert Threshold.from_dict(t.to_dict()) == t
    aug = normal_threshold([1.0, 2.0], source="augmented_views")
    assert not aug.guaranteed
    assert "estimate only" in aug.describe() and "if exchangeable" in t.describe()
    held = normal_threshold([1.0, 3.0, 2.0], false_alarm_rate=0.05, source="held_out")
    text = held.describe()
    # Plain words: the assumption, the rate it promises, how many images the request needs.
    assert "guaranteed" not in text and "If new good parts vary like these" in text
    assert "at most 25%" in text and "needs at least 19 good images" in text


def test_outlying_names_one_image_far_above_the_others():
    from protorefine_jax.threshold import outlying

    # The greasy-image case: nine images at 2.5-5.6, one at 12.1.
    scores = [2.5, 3.1, 3.4, 3.9, 4.2, 4.4, 4.8, 5.1, 5.6, 12.1]
    assert outlying(scores).tolist() == [False] * 9 + [True]
    # Four strays among twelve are still named (median and MAD of the others).
    clean = [3.0, 3.2, 3.3, 3.5, 3.6, 3.8, 4.0, 4.1]
    flags = outlying(clean + [20.0, 25.0, 30.0, 33.6])
    assert flags.tolist() == [False] * 8 + [True] * 4
    # Two clean images and a stray: named (two others are enough).
    assert outlying([3.9, 4.4, 21.3]).tolist() == [False, False, True]
    # Too few to compare, near-identical images, a low score, a good image
    # 1.5 times the others: nothing named.
    assert not outlying([2.0, 30.0]).any()
    assert not outlying([1.0, 5.0, 9.0]).any()
    assert not outlying([2.0, 2.0, 2.0, 2.01]).any()
    assert not outlying([3.0, 3.2, 3.4, 3.6, 0.1]).any()
    assert not outlying([4.8, 5.6, 5.3, 7.6]).any()


@pytest.mark.parametrize(
    ("kwargs", "msg"),
    [
        (dict(scores=[]), "non-empty 1-D"),
        (dict(scores=[1.0, np.nan]), "non-finite"),
        (dict(scores=[1.0], false_alarm_rate=0.0), r"in \(0, 1\)"),
        (dict(scores=[1.0], margin=-0.1), "margin must be >= 0"),
        (dict(scores=[1.0], source="views"), "unknown source"),
    ],
)
def test_normal_threshold_errors(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        normal_threshold(**kwargs)


def test_unknown_threshold_fields_are_refused():
    with pytest.raises(ValueError, match="unknown threshold fields"):
        Threshold.from_dict({"value": 1.0, "kind": "f1", "source": "x", "num_scores": 1, "z": 0})


@pytest.mark.parametrize("seed", range(5))
def test_f1_threshold_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(60) < 0.4
    scores = rng.normal(size=60) + 1.2 * labels
    scores[:5] = scores[5]  # ties
    t = f1_threshold(labels.astype(int), scores)
    p, r, _ = precision_recall_curve(labels, scores)
    best = np.max(np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0))
    assert t.f1 == pytest.approx(best, rel=1e-12)
    # The decisions `score > value` reach that F1.
    assert f1_score(labels, scores > t.value) == pytest.approx(best, rel=1e-12)
    assert t.kind == "f1" and t.num_scores == 60


def test_f1_threshold_errors():
    with pytest.raises(ValueError, match="good AND defective"):
        f1_threshold([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="labels shape"):
        f1_threshold([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="0 \\(good\\) / 1"):
        f1_threshold([0, 2], [0.1, 0.2])


def test_decision_rates():
    rates = decision_rates([0, 0, 0, 1, 1], [0.1, 0.5, 0.9, 0.4, 0.95], 0.45)
    assert rates.false_alarms == 2 and rates.misses == 1
    assert rates.false_alarm_rate == pytest.approx(2 / 3) and rates.miss_rate == pytest.approx(0.5)
    only_good = decision_rates([0, 0], [0.1, 0.2], 0.15)
    assert only_good.false_alarm_rate == 0.5 and np.isnan(only_good.miss_rate)


def test_from_support_scores_names_by_the_others_and_leaves_them_out():
    from protorefine_jax.calibration import SupportScores
    from protorefine_jax.threshold import from_support_scores

    # Image 3 is unlike the others against them (a stray), though its quadrants look normal.
    scores = SupportScores(
        held_out=np.array([3.0, 3.5, 4.0, 3.2]), against_others=np.array([4.0, 4.4, 4.2, 30.0])
    )
    t, outliers = from_support_scores(scores, 0.05)
    assert outliers.tolist() == [False, False, False, True]
    assert t.num_scores == 3 and t.value == pytest.approx(4.0) and t.source == "held_out"
    # Without scores against the others (one or two images), nothing is named.
    t2, none = from_support_scores(SupportScores(np.array([3.0, 5.0])), 0.05)
    assert not none.any() and t2.value == pytest.approx(5.0)
