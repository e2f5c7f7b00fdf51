import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import lowrank_bank_and_queries, lowrank_features, subspace

from protorefine_jax import RefineConfig, online_refine_and_score, refine_and_score
from protorefine_jax import calibration as cal
from protorefine_jax.detectors import PatchCore

CFG = RefineConfig(num_iters=3, sinkhorn_iters=20, image_size=None)
# W only: the closed form, no EM loop (cheap to compile; has a float64 reference).
W_ONLY = CFG.replace(use_transport=False)


def support(rng, k=2, grid=(4, 4), c=24):
    basis = subspace(rng, 6, c)
    return lowrank_features(rng, (k, grid[0] * grid[1], c), basis)


@pytest.mark.parametrize("k, grid", [(1, (4, 4)), (3, (4, 6)), (2, (5, 3))])
def test_holdout_splits_hold_out_each_quadrant_of_each_image_once(k, grid):
    m = grid[0] * grid[1]
    splits = cal.holdout_splits(k, grid)
    assert len(splits) == 4 * k
    held_all = np.concatenate([held for _, held in splits])
    np.testing.assert_array_equal(np.sort(held_all), np.arange(k * m))
    for bank_rows, held in splits:
        assert len(np.intersect1d(bank_rows, held)) == 0
        np.testing.assert_array_equal(np.union1d(bank_rows, held), np.arange(k * m))
        assert len(np.unique(held // m)) == 1  # one quadrant of one image
    # The quadrants of one image tile its grid: rows/cols split at the middle.
    first = splits[0][1].reshape(-1)
    rows, cols = np.divmod(first, grid[1])
    assert rows.max() < grid[0] // 2 and cols.max() < grid[1] // 2


def test_holdout_splits_reject_a_grid_without_quadrants():
    with pytest.raises(ValueError, match=r"at least 2 x 2 patches, got \(1, 8\)"):
        cal.holdout_splits(2, (1, 8))


def test_fuse_is_the_max_of_standardised_scores():
    rng = np.random.default_rng(0)
    host, refined = rng.random(50), rng.random(50)
    c = cal.ScoreCalibration(*map(jnp.float32, (0.3, 0.2, 0.1, 0.05)))
    want = np.maximum((host - 0.3) / 0.2, (refined - 0.1) / 0.05)
    got = cal.fuse(jnp.asarray(host), jnp.asarray(refined), c)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_statistics_are_median_and_iqr_and_floor_a_zero_spread():
    rng = np.random.default_rng(1)
    host, refined = rng.gamma(2.0, size=301), np.full(40, 0.5)
    s = cal.statistics(host, refined)
    srt = np.sort(host)  # 301 samples: quartiles are order statistics 75, 150, 225
    np.testing.assert_allclose(
        [s.host_loc, s.host_scale], [srt[150], srt[225] - srt[75]], rtol=1e-6
    )
    assert float(s.refined_loc) == pytest.approx(0.5)
    assert float(s.refined_scale) > 0  # floored: constant scores never divide by 0


@pytest.mark.parametrize("bad", [np.array([]), np.array([1.0, np.nan])])
def test_statistics_reject_empty_or_nonfinite_scores(bad):
    with pytest.raises(ValueError, match="non-empty, finite"):
        cal.statistics(bad, np.ones(3))


def test_ridge_in_force_follows_the_real_bank():
    cfg = RefineConfig(ridge=1e-2, ridge_wide=1e-1)
    assert cal.ridge_in_force(10, 24, cfg).ridge == pytest.approx(1e-2)
    wide = cal.ridge_in_force(24, 24, cfg)
    assert wide.ridge == pytest.approx(1e-1) and wide.ridge_wide == pytest.approx(1e-1)


def _numpy_reference(sup, cfg, grid):
    """float64 host and W-only scores of every hold-out, with alpha = 1 (bank = all rest rows)."""
    k, m, c = sup.shape
    flat = sup.reshape(k * m, c).astype(np.float64)
    rel = cfg.ridge_wide if k * m >= c else cfg.ridge  # real bank: alpha 1, n = k m
    hosts, refs = [], []
    for bank_rows, held in cal.holdout_splits(k, grid):
        bank, q = flat[bank_rows], flat[held]
        d = ((q[:, None, :] - bank[None, :, :]) ** 2).sum(-1)
        hosts.append(d.min(1))
        gram = bank @ bank.T
        delta = rel * np.trace(gram) / len(bank)
        w0 = q @ bank.T @ np.linalg.inv(gram + delta * np.eye(len(bank)))
        r = w0 @ bank
        refs.append((((q[:, None, :] - r[None, :, :]) ** 2).sum(-1)).min(1))
    return np.concatenate(hosts), np.concatenate(refs)


@pytest.mark.parametrize("k, c", [(1, 24), (2, 40)])  # 2 shots: 24 rows < c, narrow ridge
def test_held_out_scores_match_a_float64_reference(rng, k, c):
    grid = (4, 4)
    sup = support(rng, k=k, grid=grid, c=c)
    host, refined = cal.held_out_scores(sup, 1.0, W_ONLY, grid)
    want_host, want_ref = _numpy_reference(sup, W_ONLY, grid)
    np.testing.assert_allclose(host, want_host, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(refined, want_ref, rtol=1e-3, atol=1e-3)


def test_held_out_refined_scores_are_the_pipelines(rng):
    """With the EM loop on, each hold-out is scored as `refine_and_score` would."""
    sup = support(rng, k=1)
    host, refined = cal.held_out_scores(sup, 1.0, CFG, (4, 4))
    bank_rows, held = cal.holdout_splits(1, (4, 4))[0]
    flat = sup.reshape(16, -1)
    cfg = cal.ridge_in_force(16, flat.shape[1], CFG).replace(grid_shape=(2, 2))
    out = refine_and_score(jnp.asarray(flat[bank_rows]), jnp.asarray(flat[held][None]), cfg)
    np.testing.assert_allclose(refined[:4], out.patch_scores[0], rtol=1e-4, atol=1e-5)
    host_out = refine_and_score(
        jnp.asarray(flat[bank_rows]),
        jnp.asarray(flat[held][None]),
        cfg.replace(use_refinement=False),
    )
    np.testing.assert_allclose(host[:4], host_out.patch_scores[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("c", [30, 34])
def test_calibrate_is_the_median_and_iqr_of_float64_held_out_scores(rng, c):
    """`calibrate` end to end against the float64 hold-outs of `_numpy_reference`.

    2 shots of 16 patches: the real bank has 32 rows, each hold-out bank 28.
    At c = 30 the real bank is wide and the hold-out banks narrow, so the
    statistics are right only under the real bank's ridge (`ridge_wide`); at
    c = 34 both are narrow.
    """
    sup = support(rng, k=2, grid=(4, 4), c=c).astype(np.float64)
    with jax.enable_x64(True):  # float64 throughout: no float32 cancellation to allow for
        got = cal.calibrate(sup, W_ONLY.replace(precision="float64"), alpha=1.0, grid_shape=(4, 4))
    host, refined = _numpy_reference(sup, W_ONLY, (4, 4))
    want = []
    for x in (host, refined):
        q25, q75 = np.percentile(x, [25, 75])
        want += [np.median(x), q75 - q25]
    # The statistics are stored as float32: their rounding is the tolerance.
    np.testing.assert_allclose(np.asarray(got[:4], np.float64), want, rtol=1e-6)
    assert float(got.refined_on) == 1.0  # no refinement check ran: the refinement stays on


def test_held_out_scores_compile_once_per_shape(rng, monkeypatch):
    calls = []
    real = cal.gram_system
    monkeypatch.setattr(cal, "gram_system", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    grid = (6, 6)  # a shape no other test uses: a fresh trace
    sup = support(rng, k=1, grid=grid, c=20)
    cal.held_out_scores(sup, 0.5, W_ONLY, grid)
    cal.held_out_scores(sup * 2.0, 0.5, W_ONLY.replace(ridge=0.05), grid)  # traced floats only
    assert len(calls) == 1


@pytest.mark.parametrize(
    "sup, grid, match",
    [
        (np.ones((16, 8), np.float32), (4, 4), r"\[k, m, c\]"),
        (np.ones((1, 16, 8), np.float32), (4, 5), "does not hold m=16"),
        (np.full((1, 16, 8), np.nan, np.float32), (4, 4), "support"),
    ],
)
def test_held_out_scores_reject_bad_support(sup, grid, match):
    with pytest.raises(ValueError, match=match):
        cal.held_out_scores(sup, 0.5, W_ONLY, grid)


# --- the calibrated score in the pipeline and the detector -------------------

PIPE = RefineConfig(num_iters=2, sinkhorn_iters=10, image_size=(8, 8))


def pipeline_data(rng, b=2, m=16, c=24, n=12):
    return tuple(map(jnp.asarray, lowrank_bank_and_queries(rng, b, m, c, n, rank=6)))


CAL = cal.ScoreCalibration(*map(jnp.float32, (0.5, 0.25, 0.1, 0.05)))


def test_refine_and_score_fuses_host_and_refined_scores(rng):
    bank, queries = pipeline_data(rng)
    fused = refine_and_score(bank, queries, PIPE, CAL)
    refined = refine_and_score(bank, queries, PIPE)  # no calibration: refined alone
    host = refine_and_score(bank, queries, PIPE.replace(use_refinement=False))
    want = np.maximum(
        (np.asarray(host.patch_scores) - 0.5) / 0.25,
        (np.asarray(refined.patch_scores) - 0.1) / 0.05,
    )
    np.testing.assert_allclose(fused.patch_scores, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fused.image_scores, want.max(1), rtol=1e-4, atol=1e-4)
    # calibrated=False ignores a calibration; host scoring never uses one.
    off = refine_and_score(bank, queries, PIPE.replace(calibrated=False), CAL)
    np.testing.assert_allclose(off.patch_scores, refined.patch_scores, rtol=1e-6)
    host_cal = refine_and_score(bank, queries, PIPE.replace(use_refinement=False), CAL)
    np.testing.assert_allclose(host_cal.patch_scores, host.patch_scores, rtol=1e-6)


def test_online_calibrated_host_part_keeps_to_the_support_bank(rng):
    bank, queries = pipeline_data(rng, b=3)
    online = online_refine_and_score(
        bank, queries, PIPE, capacity=8, add_per_query=4, calibration=CAL
    )
    offline = refine_and_score(bank, queries[:1], PIPE, CAL)
    # The first query sees exactly the offline bank.
    np.testing.assert_allclose(
        online.patch_scores[0], offline.patch_scores[0], rtol=1e-4, atol=1e-4
    )
    # Later queries: the host z-score is the support bank's, whatever the buffer holds.
    host = refine_and_score(bank, queries, PIPE.replace(use_refinement=False))
    z_host = (np.asarray(host.patch_scores) - 0.5) / 0.25
    assert np.all(np.asarray(online.patch_scores) >= z_host - 1e-5 * np.abs(z_host) - 1e-4)


def test_patchcore_detector_fits_and_applies_its_calibration(rng):
    det = PatchCore.create("efficientnet_lite0", image_size=64)  # 8 x 8 grid
    m, c = 64, det.extractor.feature_dim
    basis = subspace(rng, 8, c)
    sup = lowrank_features(rng, (1, m, c), basis)
    queries = lowrank_features(rng, (2, m, c), basis)
    cfg = det.config(num_iters=2, sinkhorn_iters=10)
    state = det.fit_features(sup, config=cfg)
    want = cal.calibrate(sup, cfg, alpha=det.alpha, grid_shape=det.extractor.grid)
    for g, w in zip(state.calibration, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6)
    out = det.score_features(state, queries, cfg)
    ref = refine_and_score(state.banks[0].prototypes, jnp.asarray(queries), cfg, want)
    np.testing.assert_allclose(out.image_scores, ref.image_scores, rtol=1e-5, atol=1e-5)
    assert det.fit_features(sup, calibrate=False).calibration is None


# --- the online scan: the same two halves as offline (issue 14) ---------------


def _numpy_online_calibrated_w_only(bank, queries, capacity, cfg, calibration):
    """float64 online calibrated W-only scores, written independently of the library.

    Host half: squared distance to the nearest SUPPORT prototype (plain
    PatchCore). Refined half: `W0 = P (G + delta I)^-1` against the support
    rows plus the buffer, with the support bank's ridge (`n < c`: `ridge`,
    scaled by the mean squared norm of the support rows). Every refined row
    is pushed (`add_per_query = m`, `capacity` a multiple of m: the coreset
    keeps every row and whole blocks are overwritten).
    """
    bank = np.asarray(bank, np.float64)
    n, c = bank.shape
    rel = cfg.ridge_wide if n >= c else cfg.ridge
    delta = rel * np.trace(bank @ bank.T) / n
    hl, hs, rl, rs = (float(x) for x in calibration[:4])
    buffer, fused, host = [], [], []
    for q in np.asarray(queries, np.float64):
        full = np.concatenate([bank] + buffer)
        gram = full @ full.T
        w0 = np.linalg.solve(gram + delta * np.eye(len(full)), full @ q.T).T
        refined = w0 @ full
        r = ((q[:, None, :] - refined[None, :, :]) ** 2).sum(-1).min(1)
        h = ((q[:, None, :] - bank[None, :, :]) ** 2).sum(-1).min(1)
        host.append(h)
        fused.append(np.maximum((h - hl) / hs, (r - rl) / rs))
        buffer = (buffer + [refined])[-(capacity // len(q)) :]
    return np.stack(host), np.stack(fused)


def _online_case(rng):
    # n = 12 support rows < c = 24 <= n + capacity = 28: a bank whose capacity
    # crosses the feature dimension while its span (the support rows') does not.
    # Features of rank 16 > n: the bank does not reproduce the queries, so the
    # refined half depends on the ridge.
    basis = subspace(rng, 16, 24)
    bank = jnp.asarray(lowrank_features(rng, (12, 24), basis))
    queries = jnp.asarray(lowrank_features(rng, (5, 16, 24), basis))
    return bank, queries, 16


def test_online_host_half_is_plain_patchcore_against_a_numpy_loop(rng):
    """With the refined half pushed out of the max (refined_loc huge), the online
    calibrated score is the host z-score alone: plain PatchCore's distance to the
    support bank, whatever the buffer holds."""
    bank, queries, cap = _online_case(rng)
    only_host = cal.ScoreCalibration(*map(jnp.float32, (0.0, 1.0, 1e30, 1.0)))
    cfg = W_ONLY.replace(grid_shape=(4, 4))
    out = online_refine_and_score(
        bank, queries, cfg, capacity=cap, add_per_query=16, calibration=only_host
    )
    want, _ = _numpy_online_calibrated_w_only(bank, queries, cap, cfg, CAL)
    np.testing.assert_allclose(out.patch_scores, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("ridges", [(1e-2, 1e-1), (1e-1, 1e-2)])
def test_online_calibrated_scores_match_a_numpy_loop(rng, ridges):
    """Both halves of every query of the stream, under the support bank's ridge
    (the regime the calibration measured), not the ridge of `n + capacity` rows."""
    bank, queries, cap = _online_case(rng)
    cfg = W_ONLY.replace(grid_shape=(4, 4), ridge=ridges[0], ridge_wide=ridges[1])
    calibration = cal.ScoreCalibration(*map(jnp.float32, (40.0, 20.0, 10.0, 5.0)))
    out = online_refine_and_score(
        bank, queries, cfg, capacity=cap, add_per_query=16, calibration=calibration
    )
    _, want = _numpy_online_calibrated_w_only(bank, queries, cap, cfg, calibration)
    # Buffer rows feed later queries: float32 differences compound (as the
    # ring-buffer test of test_pipeline.py).
    np.testing.assert_allclose(out.patch_scores, want, rtol=2e-3, atol=2e-3)
    # The first query is the offline calibrated PatchCore+ exactly.
    offline = refine_and_score(bank, queries[:1], cfg, calibration)
    np.testing.assert_allclose(out.patch_scores[0], offline.patch_scores[0], rtol=1e-4, atol=1e-4)


def test_cross_image_units_match_a_float64_reference(rng):
    """Each whole image against a bank of the other images (alpha 1: every other row)."""
    k, grid, c = 3, (4, 4), 40  # each bank 32 rows; the real bank 48 >= c rows: the wide ridge
    sup = support(rng, k=k, grid=grid, c=c)
    host, refined = cal.cross_image_units(sup, 1.0, W_ONLY)
    assert host.shape == refined.shape == (k, 1, 16)
    flat = sup.astype(np.float64)
    for i in range(k):
        bank = np.delete(flat, i, axis=0).reshape(-1, c)
        q = flat[i]
        d = ((q[:, None] - bank[None]) ** 2).sum(-1)
        gram = bank @ bank.T
        delta = W_ONLY.ridge_wide * np.trace(gram) / len(bank)  # the real bank's ridge
        r = q @ bank.T @ np.linalg.inv(gram + delta * np.eye(len(bank))) @ bank
        np.testing.assert_allclose(host[i, 0], d.min(1), rtol=1e-3, atol=1e-3)
        want = (((q[:, None] - r[None]) ** 2).sum(-1)).min(1)
        np.testing.assert_allclose(refined[i, 0], want, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="at least 2 support images"):
        cal.cross_image_units(sup[:1], 1.0, W_ONLY)


def test_support_image_scores_are_the_largest_held_out_image_score():
    c0 = cal.ScoreCalibration(*(np.float32(v) for v in (1.0, 2.0, 0.0, 1.0)))
    host = np.array([[[1.0, 3.0], [1.0, 9.0]], [[1.0, 1.0], [1.0, 1.0]]])  # [k=2, 1+V=2, m=2]
    refined = np.array([[[0.0, 0.5], [0.0, 0.0]], [[4.0, 0.0], [0.0, 0.0]]])
    cross_h = np.full((2, 1, 2), 1.0)
    cross_r = np.array([[[0.0, 0.0]], [[0.0, 6.0]]])
    held = cal.HeldOut(host, refined, cross_h, cross_r)
    fused_cfg = RefineConfig()
    # z_h = (h - 1) / 2, z_r = r: image 0 tops at its view's host 9 -> 4, image 1 at refined 4;
    # against the others, image 1's refined 6.
    got = cal.support_image_scores(held, fused_cfg, c0)
    np.testing.assert_allclose(got.held_out, [4.0, 4.0])
    np.testing.assert_allclose(got.against_others, [0.0, 6.0])
    # Host method: raw host scores; refined alone: raw refined scores.
    host_cfg = fused_cfg.replace(use_refinement=False)
    np.testing.assert_allclose(cal.support_image_scores(held, host_cfg, c0).held_out, [9.0, 1.0])
    refined_cfg = fused_cfg.replace(calibrated=False)
    np.testing.assert_allclose(cal.support_image_scores(held, refined_cfg, c0).held_out, [0.5, 4.0])
    # Without cross-image hold-outs: the quadrant hold-outs alone.
    one = cal.support_image_scores(cal.HeldOut(host[:1], refined[:1]), fused_cfg, c0)
    np.testing.assert_allclose(one.held_out, [4.0])
    assert one.against_others is None


def test_nuisance_views_are_fixed_by_the_pixels_not_the_position(rng):
    images = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    views = cal.nuisance_views(images, 2)
    assert views.shape == (3, 2, 16, 16, 3) and views.dtype == np.uint8
    swapped = cal.nuisance_views(images[::-1], 2)
    np.testing.assert_array_equal(swapped[::-1], views)
    assert not np.array_equal(views[0, 0], views[0, 1])  # two different views
    with pytest.raises(ValueError, match=r"\[k, H, W, 3\]"):
        cal.nuisance_views(images[0], 2)


def test_calibration_error_is_zero_shift_unit_iqr_on_the_calibrations_own_scores(rng):
    host = rng.gamma(2.0, 1.0, size=(6, 64))
    refined = rng.gamma(3.0, 0.5, size=(6, 64))
    c = cal.statistics(host, refined)
    err = cal.calibration_error(host, refined, c)
    assert abs(err["host_shift"]) < 1e-6 and abs(err["refined_shift"]) < 1e-6
    assert err["host_iqr_ratio"] == pytest.approx(1.0, rel=1e-5)
    assert err["refined_iqr_ratio"] == pytest.approx(1.0, rel=1e-5)
    # Scores of new parts one IQR higher in the refined half: shift 1, and it wins more often.
    moved = cal.calibration_error(host, refined + float(c.refined_scale), c)
    assert moved["refined_shift"] == pytest.approx(1.0, rel=1e-5)
    assert moved["refined_share"] > err["refined_share"]
