"""Calibrated WinCLIP+ (issue 14) on a tiny random CLIP: PatchCore+'s support-set
calibration per few-shot scale, checked against float64 numpy.

The default-suite tests use W only (`use_transport=False`: the refined
transform is the least-squares `W0`, which has a closed-form numpy reference
and compiles without the EM loop), one window size and alpha 1 (every
support row in the bank, so the reference needs no coreset). The slow test
runs the shipped EM refinement end to end from images at 1 shot.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_clip_winclip import GRID, SPEC, _as_list, _harmonic, random_features

from protorefine_jax.calibration import ScoreCalibration
from protorefine_jax.clip import winclip
from protorefine_jax.clip.towers import MultiscaleFeatures
from protorefine_jax.detectors.base import DetectorState
from protorefine_jax.detectors.winclip import WinClip
from protorefine_jax.io import model_dir

K = 2  # shots: the patch scale's bank has k m = 32 rows = D (wide ridge), windows 8 < E
WINDOWS = (3,)  # 3x3 windows on the 4x4 grid: a 2 x 2 grid of window positions
CFG = winclip.winclip_config(clip=SPEC, image_size=None, window_sizes=WINDOWS, use_transport=False)


def _one_window_size(f: MultiscaleFeatures) -> MultiscaleFeatures:
    return MultiscaleFeatures(f.image, f.patches, (f.windows[1],))  # the 3x3 windows


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    full_support = random_features(rng, K)
    support = _one_window_size(full_support)
    queries = _one_window_size(random_features(rng, 3, base=_as_list(full_support), noise=0.7))
    text = jnp.asarray(rng.standard_normal((2, SPEC.embed_dim)), jnp.float32)
    banks = winclip.build_banks(support, alpha=1.0)
    cals = winclip.calibrate(support, CFG, alpha=1.0)
    return support, queries, text, banks, cals


# --- float64 numpy references ------------------------------------------------


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _host_and_w_only(query, bank, rel):
    """float64 cosine host and W-only refined scores of `query` rows against `bank` rows."""
    q, b = _unit(query), _unit(bank)
    host = np.maximum((1 - q @ b.T).min(1) / 2, 0)
    gram = b @ b.T
    delta = rel * np.trace(gram) / len(b)
    refined_protos = q @ b.T @ np.linalg.inv(gram + delta * np.eye(len(b))) @ b  # R = W0 M
    cos = (q @ refined_protos.T) / np.linalg.norm(refined_protos, axis=-1)[None, :]
    return host, np.maximum((1 - cos.max(1)) / 2, 0)


def _rel_ridge(rows, dim):
    r = CFG.refine
    return r.ridge_wide if rows >= dim else r.ridge


def _held_out_numpy(feats, grid):
    """Every support image's every grid quadrant against all other rows of the scale."""
    k, m, c = feats.shape
    rows, cols = np.divmod(np.arange(m), grid[1])
    quadrant = (rows >= grid[0] // 2) * 2 + (cols >= grid[1] // 2)
    flat = np.asarray(feats, np.float64).reshape(k * m, c)
    image = np.repeat(np.arange(k), m)
    quad = np.tile(quadrant, k)
    rel = _rel_ridge(k * m, c)  # the ridge of the real bank (alpha 1: k m rows)
    hosts, refs = [], []
    for i in range(k):
        for q in range(4):
            held = (image == i) & (quad == q)
            h, r = _host_and_w_only(flat[held], flat[~held], rel)
            hosts.append(h)
            refs.append(r)
    return np.concatenate(hosts), np.concatenate(refs)


def _median_iqr(x):
    q25, med, q75 = np.quantile(x, [0.25, 0.5, 0.75])
    return med, q75 - q25


def _scales(f):
    return (f.patches, *f.windows)


SCALE_GRIDS = (GRID, (2, 2))


# --- (a) the statistics -------------------------------------------------------


def test_calibration_is_the_statistics_of_held_out_patches_and_windows(data):
    support, _, _, _, cals = data
    assert len(cals) == 1 + len(WINDOWS) and all(isinstance(c, ScoreCalibration) for c in cals)
    for feats, grid, got in zip(_scales(support), SCALE_GRIDS, cals, strict=True):
        host, refined = _held_out_numpy(np.asarray(feats), grid)
        assert host.size == K * grid[0] * grid[1]  # every row held out exactly once
        want = (*_median_iqr(host), *_median_iqr(refined))
        np.testing.assert_allclose(np.asarray(got[:4], np.float64), want, rtol=2e-4, atol=2e-5)
        assert float(got.refined_on) == 1.0  # WinCLIP+ runs no refinement check


# --- (b) the calibrated score -------------------------------------------------


def _few_shot_numpy(queries, support, cals, calibrated=True):
    """Few-shot grid per query: per scale fused in host units, windows aggregated, mean."""
    out = []
    for b in range(queries.image.shape[0]):
        grids = []
        for s, (qf, sf) in enumerate(zip(_scales(queries), _scales(support), strict=True)):
            bank = np.asarray(sf).reshape(-1, sf.shape[-1])
            host, refined = _host_and_w_only(np.asarray(qf[b]), bank, _rel_ridge(*bank.shape))
            score = refined
            if calibrated:
                hl, hs, rl, rs = (float(v) for v in cals[s][:4])
                z = np.maximum((host - hl) / hs, (refined - rl) / rs)
                score = np.maximum(hl + hs * z, 0.0)
                assert np.all(score >= host - 1e-6)  # never below the host's distance
            grids.append(score.reshape(GRID) if s == 0 else _harmonic(score, WINDOWS[s - 1]))
        out.append(np.mean(grids, axis=0))
    return np.stack(out)


def test_calibrated_score_is_the_numpy_fusion_of_host_and_refined(data):
    support, queries, text, banks, cals = data
    out = winclip.score(queries, banks, text, CFG, cals)
    want = _few_shot_numpy(queries, support, cals)
    np.testing.assert_allclose(out.few_shot_grid, want, rtol=1e-3, atol=1e-5)
    s0 = np.asarray(out.zero_shot_scores)
    np.testing.assert_allclose(out.image_scores, (s0 + want.max((1, 2))) / 2, rtol=1e-3)  # Eq. 9
    zs = np.asarray(out.zero_shot_grid)
    np.testing.assert_allclose(out.maps, (zs + want) / 2, rtol=1e-3, atol=1e-5)
    # The fusion changes the scores (the test would pass vacuously otherwise).
    plain = _few_shot_numpy(queries, support, cals, calibrated=False)
    assert np.max(np.abs(want - plain)) > 1e-2


# --- (c) calibrated=False is the uncalibrated WinCLIP+ ---------------------------


def test_uncalibrated_winclip_plus_ignores_the_calibration(data):
    support, queries, text, banks, cals = data
    before = winclip.score(queries, banks, text, CFG)  # no calibration: the pre-issue-14 path
    off = CFG.replace(refine=CFG.refine.replace(calibrated=False))
    after = winclip.score(queries, banks, text, off, cals)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)
    want = _few_shot_numpy(queries, support, cals, calibrated=False)
    np.testing.assert_allclose(before.few_shot_grid, want, rtol=1e-3, atol=1e-5)


# --- the detector: fit keeps it, score applies it, the state round-trips ------


def _detector():
    settings = (("window_sizes", WINDOWS), ("image_size", None), ("use_transport", False))
    return WinClip(SPEC, tokenizer=None, alpha=1.0, settings=settings)


def test_detector_fits_and_applies_the_calibration(data):
    support, queries, text, banks, cals = data
    det = _detector()
    assert det.config() == CFG
    state = det.fit_features(support, context=text)
    for got, want in zip(jax.tree.leaves(state.calibration), jax.tree.leaves(cals), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    out = det.score_features(state, queries, det.config())
    ref = winclip.score(queries, banks, text, CFG, cals)
    np.testing.assert_allclose(out.image_scores, ref.image_scores, rtol=1e-6)
    assert det.fit_features(support, context=text, calibrate=False).calibration is None


def test_detector_state_round_trips_through_a_model_dir(data, tmp_path):
    support, queries, text, _, _ = data
    det = _detector()
    state = det.fit_features(support, context=text)
    model_dir.save_model(tmp_path / "m", state, {"detector": {"family": det.family}})
    loaded = model_dir.load_model(tmp_path / "m").state
    assert isinstance(loaded, DetectorState)
    assert all(isinstance(c, ScoreCalibration) for c in loaded.calibration)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(got, want)
    a = det.score_features(state, queries, det.config())
    b = det.score_features(loaded, queries, det.config())
    np.testing.assert_allclose(a.image_scores, b.image_scores, rtol=1e-6)
    np.testing.assert_allclose(a.maps, b.maps, rtol=1e-6)


def test_eval_recalibrates_winclip_plus_ablations_only(data):
    from protorefine_jax.app.batching import BatchedDetector

    support, _, _, _, cals = data
    det = _detector()
    host = BatchedDetector(det, params=None, batch_size=2)
    state = host.fit(support)
    assert host.calibrated_state(state, det.config()) is state  # the fitted config
    assert host.calibrated_state(state, det.config(calibrated=False)) is state
    assert host.calibrated_state(state, det.config(use_refinement=False)) is state
    other = host.calibrated_state(state, det.config(ridge=0.05))  # a traced float: no recompile
    want = winclip.calibrate(support, CFG.replace(refine=CFG.refine.replace(ridge=0.05)), alpha=1.0)
    for got, w in zip(jax.tree.leaves(other.calibration), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(got, w, rtol=1e-6)
    assert not np.allclose(other.calibration[1].refined_loc, cals[1].refined_loc)


# --- (e) no retrace ----------------------------------------------------------------


def test_a_new_calibration_does_not_recompile(data, monkeypatch):
    _, queries, text, banks, cals = data
    calls = []
    original = winclip.few_shot_query
    monkeypatch.setattr(
        winclip, "few_shot_query", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    first = winclip.score(queries, banks, text, CFG, cals)
    traced = len(calls)  # 1, or 0 if an earlier test compiled this program
    assert traced <= 1
    shifted = tuple(
        c._replace(host_loc=c.host_loc + 0.05, refined_scale=2 * c.refined_scale) for c in cals
    )
    second = winclip.score(queries, banks, text, CFG, shifted)
    assert len(calls) == traced  # new statistics (another support set) reuse the program
    assert not np.allclose(first.image_scores, second.image_scores, atol=1e-4)


# --- errors ------------------------------------------------------------------------


def test_calibration_errors_name_the_problem(data):
    support, queries, text, banks, cals = data
    with pytest.raises(ValueError, match=r"expected 2 calibrations .* got 1; calibrate with the"):
        winclip.score(queries, banks, text, CFG, cals[:1])
    whole = winclip.winclip_config(clip=SPEC, window_sizes=(4,))  # one window: a 1 x 1 grid
    with pytest.raises(ValueError, match=r"4x4 windows form a \(1, 1\) grid .* calibrate=False"):
        winclip.calibrate(support, whole, alpha=1.0)
    two = winclip.winclip_config(clip=SPEC, window_sizes=(2, 3))
    with pytest.raises(ValueError, match="features hold 2 scales but the config names 3"):
        winclip.calibrate(support, two, alpha=1.0)


# --- end to end, shipped refinement (slow) -------------------------------------------


@pytest.mark.slow
def test_calibrated_winclip_plus_end_to_end_at_one_shot(rng):
    from test_clip_towers import init_params

    params = init_params(SPEC)
    images = rng.uniform(0, 255, (3, 64, 64, 3)).astype(np.float32)
    det = WinClip(SPEC, tokenizer=None, alpha=0.5)
    cfg = det.config(num_iters=2)
    feats = det.features(params, images[:1])
    text = jnp.asarray(rng.standard_normal((2, SPEC.embed_dim)), jnp.float32)
    state = det.fit_features(feats, context=text, config=cfg)  # 1 shot: the quadrants
    assert len(state.calibration) == 3
    for c in state.calibration:
        assert float(c.host_scale) > 0 and float(c.refined_scale) > 0
    out = det.score(params, state, images[1:], cfg)
    assert np.all(np.isfinite(out.maps)) and out.maps.shape == (2, 64, 64)
    # Per scale the fused score is at least the host's distance to the same coreset, and
    # harmonic means and averages are monotone: so is the few-shot grid.
    host_cfg = det.config(use_refinement=False, plain_memory="coreset")
    host = det.score(params, state, images[1:], host_cfg)
    assert np.all(np.asarray(out.few_shot_grid) >= np.asarray(host.few_shot_grid) - 1e-5)
    uncal = det.score(params, state, images[1:], det.config(num_iters=2, calibrated=False))
    assert not np.allclose(uncal.few_shot_grid, out.few_shot_grid, atol=1e-4)
    # Plain WinCLIP never uses a calibration.
    plain = det.config(use_refinement=False)
    np.testing.assert_array_equal(
        det.score(params, state, images[1:], plain).image_scores,
        det.score(params, state._replace(calibration=None), images[1:], plain).image_scores,
    )
