"""The fit-time refinement check: pasted defects, the decision, and the gated fusion."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import lowrank_features, subspace
from sklearn.metrics import roc_auc_score

from protorefine_jax import RefineConfig, metrics
from protorefine_jax import calibration as cal
from protorefine_jax.io import model_dir
from protorefine_jax.pseudo_anomalies import KINDS, pseudo_anomalies, support_pseudo_anomalies

CFG = RefineConfig(num_iters=3, sinkhorn_iters=20, image_size=None)


def image(seed=0, h=64, w=48):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(h, w, 3)).astype(np.uint8)


def test_pseudo_anomalies_are_deterministic_and_change_only_their_defect():
    img = image()
    a, ma = pseudo_anomalies(img, 8, seed=3)
    b, mb = pseudo_anomalies(img, 8, seed=3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ma, mb)
    c, _ = pseudo_anomalies(img, 8, seed=4)
    assert not np.array_equal(a, c)
    assert a.shape == (8, 64, 48, 3) and a.dtype == np.uint8 and ma.shape == (8, 64, 48)
    for i in range(8):
        assert ma[i].any(), "every copy has a defect"
        changed = np.any(a[i] != img, axis=-1)
        if KINDS[i % len(KINDS)] in ("cutpaste", "scar"):
            # Exactly inside the mask: nothing else moves.
            assert not (changed & ~ma[i]).any()
            assert changed[ma[i]].mean() > 0.3


def test_support_pseudo_anomalies_do_not_depend_on_position_or_set():
    x, y = image(1), image(2)
    both, _ = support_pseudo_anomalies(np.stack([x, y]), 4)
    alone, _ = support_pseudo_anomalies(y[None], 4)
    np.testing.assert_array_equal(both[1], alone[0])
    other, _ = support_pseudo_anomalies(y[None], 4, salt=1)
    assert not np.array_equal(other[0], alone[0])


def test_pseudo_anomalies_refuse_bad_input():
    with pytest.raises(ValueError, match=r"\[H, W, 3\] with H, W >= 16"):
        pseudo_anomalies(np.zeros((8, 8, 3)), 2, 0)
    with pytest.raises(ValueError, match="count must be >= 1"):
        pseudo_anomalies(image(), 0, 0)


def _units(rng, n=3, clean=5, pasted=4, m=16, refined_helps=True):
    """Held-out units where pasted copies stick out in the refined half (or only add noise)."""
    host = rng.normal(size=(n, clean + pasted, m))
    refined = rng.normal(size=(n, clean + pasted, m))
    host[:, clean:, 0] += 1.0  # the host sees the defects a little
    if refined_helps:
        refined[:, clean:, 0] += 6.0  # the refined half sees them clearly
    else:
        refined[:, 1:clean, 0] += 6.0  # the refined half flags normal variation
    return host, refined


def test_check_units_auroc_matches_sklearn_on_unit_maxima():
    rng = np.random.default_rng(0)
    host, refined = _units(rng)
    got = cal.check_units(host, refined, pasted=4)
    # Independent reference: float64 z-scores of the originals' statistics, sklearn's AUROC.
    q = lambda x: np.quantile(x, [0.25, 0.5, 0.75])  # noqa: E731
    h25, h50, h75 = q(host[:, 0])
    r25, r50, r75 = q(refined[:, 0])
    zh, zr = (host - h50) / (h75 - h25), (refined - r50) / (r75 - r25)
    labels = np.r_[np.zeros(3 * 5), np.ones(3 * 4)]

    def ref(z):
        best = z.max(-1)
        return 100 * roc_auc_score(labels, np.r_[best[:, :5].ravel(), best[:, 5:].ravel()])

    assert float(got.host_auroc) == pytest.approx(ref(zh), abs=1e-3)
    assert float(got.fused_auroc) == pytest.approx(ref(np.maximum(zh, zr)), abs=1e-3)
    assert (float(got.images), float(got.pasted)) == (3.0, 4.0)
    assert got.keep


def test_check_drops_the_refinement_only_when_the_host_is_significantly_better():
    rng = np.random.default_rng(1)
    host, refined = _units(rng, refined_helps=False)
    check = cal.check_units(host, refined, pasted=4)
    assert float(check.host_better_z) >= cal.CHECK_Z and not check.keep
    # Identical halves separate equally: nothing shows the refinement hurts, it stays.
    same = cal.check_units(host, host.copy(), pasted=4)
    assert float(same.host_better_z) == 0.0 and same.keep
    with pytest.raises(ValueError, match="need clean and pasted units"):
        cal.check_units(host, refined, pasted=0)


def test_check_units_take_the_statistics_they_are_given():
    """Units scored as new parts are judged in the deployed statistics, not their own."""
    rng = np.random.default_rng(2)
    n, clean, pasted, m = 6, 5, 8, 16
    host = rng.normal(size=(n, clean + pasted, m))
    host[:, clean:, 0] += 4.0  # the host sees the defects
    refined = rng.normal(size=host.shape)  # the refined half: noise alone
    own = cal.statistics(host[:, 0], refined[:, 0])
    same = cal.check_units(host, refined, pasted, calibration=own)
    assert same == cal.check_units(host, refined, pasted)
    # Statistics under which every unit's refined half reads far above normal (what the
    # held-out rings showed on new parts): the fused max is refined noise, the host
    # separates far better, and the refinement is dropped.
    inflated = own._replace(refined_loc=own.refined_loc - 20.0 * own.refined_scale)
    off = cal.check_units(host, refined, pasted, calibration=inflated)
    assert float(off.fused_auroc) < float(same.fused_auroc) - 20.0
    assert not off.keep and same.keep


def test_paired_auroc_matches_sklearn_and_a_bootstrap_of_its_difference():
    rng = np.random.default_rng(5)
    labels = np.r_[np.zeros(60), np.ones(40)]
    a = rng.normal(size=100) + 1.2 * labels
    b = 0.7 * a + rng.normal(size=100) * 0.8 + 0.3 * labels
    b[:5] = a[:5]  # ties between samples too
    got = metrics.paired_auroc(labels, a, b)
    assert got.first == pytest.approx(100 * roc_auc_score(labels, a), abs=1e-9)
    assert got.second == pytest.approx(100 * roc_auc_score(labels, b), abs=1e-9)
    # The standard error of the difference against a stratified bootstrap (independent).
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    diffs = []
    for _ in range(2000):
        idx = np.r_[rng.choice(neg, neg.size), rng.choice(pos, pos.size)]
        y = labels[idx]
        diffs.append(roc_auc_score(y, a[idx]) - roc_auc_score(y, b[idx]))
    se = (got.first - got.second) / 100 / got.z
    assert se == pytest.approx(np.std(diffs), rel=0.15)
    assert metrics.paired_auroc(labels, a, a).z == 0.0


def test_fuse_with_the_refinement_off_is_the_host_z_score_and_does_not_recompile():
    rng = np.random.default_rng(2)
    host, refined = rng.random(40), rng.random(40) * 10
    on = cal.ScoreCalibration(*map(jnp.float32, (0.3, 0.2, 0.1, 0.05, 1.0)))
    off = on._replace(refined_on=jnp.float32(0.0))
    traces = []

    @jax.jit
    def f(h, r, c):
        traces.append(1)
        return cal.fuse(h, r, c)

    h, r = jnp.asarray(host, jnp.float32), jnp.asarray(refined, jnp.float32)
    np.testing.assert_allclose(
        f(h, r, on), np.maximum((host - 0.3) / 0.2, (refined - 0.1) / 0.05), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(f(h, r, off), (host - 0.3) / 0.2, rtol=1e-5, atol=1e-5)
    assert len(traces) == 1
    # The support scores are in the same units: the threshold follows the decision.
    held = cal.HeldOut(host.reshape(1, 1, 40), refined.reshape(1, 1, 40))
    s_on = cal.support_image_scores(held, CFG, on).held_out
    s_off = cal.support_image_scores(held, CFG, off).held_out
    assert float(s_off[0]) == pytest.approx(np.max((host - 0.3) / 0.2), rel=1e-5)
    assert float(s_on[0]) > float(s_off[0])


def test_refinement_check_scores_pasted_features_against_the_calibration_hold_outs():
    rng = np.random.default_rng(3)
    grid, c = (4, 4), 24
    basis = subspace(rng, 6, c)
    sup = lowrank_features(rng, (2, 16, c), basis)
    views = sup[:, None] + 0.01 * rng.normal(size=(2, 2, 16, c)).astype(np.float32)
    pasted = np.repeat(sup[:, None], 3, axis=1).copy()
    pasted[:, :, 5] += 3.0 * rng.normal(size=(2, 3, c)).astype(np.float32)  # one odd patch
    check = cal.refinement_check(sup, 0.5, CFG, grid, pasted, views)
    host, refined = cal.held_out_units(sup, 0.5, CFG, grid, np.concatenate([views, pasted], 1))
    want = cal.check_units(host, refined, 3)
    assert float(check.host_auroc) == pytest.approx(float(want.host_auroc))
    assert float(check.fused_auroc) == pytest.approx(float(want.fused_auroc))
    assert float(check.host_auroc) > 50.0  # the odd patch is seen
    with pytest.raises(ValueError, match=r"pasted must be \[n, P, m, c\]"):
        cal.refinement_check(sup, 0.5, CFG, grid, pasted[:1], views)


def test_check_images_are_all_up_to_the_budget_then_evenly_spaced():
    np.testing.assert_array_equal(cal.check_images(3), [0, 1, 2])
    chosen = cal.check_images(50)
    assert len(chosen) == cal.HoldoutBudget().exact_max
    assert chosen[0] == 0 and chosen[-1] == 49 and np.all(np.diff(chosen) > 0)


def test_a_state_saved_before_the_check_loads_with_the_refinement_on(tmp_path):
    old = {"calibration": cal.ScoreCalibration(*map(jnp.float32, (1.0, 2.0, 3.0, 4.0, 1.0)))}
    structure, arrays = model_dir.encode_tree(old)
    fields = structure["items"]["calibration"]["fields"]
    key = fields.pop("refined_on")["key"]  # what a model directory of the previous version holds
    del arrays[key]
    back = model_dir.decode_tree(structure, arrays)
    assert float(back["calibration"].refined_on) == 1.0
    assert float(back["calibration"].refined_scale) == 4.0
