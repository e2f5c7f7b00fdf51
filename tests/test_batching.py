"""BatchedDetector: the eval's fused PatchCore+ scores from its two halves."""

import numpy as np

from protorefine_jax.app.batching import BatchedDetector, score_features
from protorefine_jax.app.methods import get_method
from protorefine_jax.detectors import PatchCore


def test_fused_scores_from_the_halves_equal_the_compiled_fused_scores():
    """The eval scores calibrated PatchCore+ from its host and refined passes (the refinement
    once, not twice); the scores, maps and diagnostics are the compiled detector's."""
    rng = np.random.default_rng(0)
    det = PatchCore.create("efficientnet_lite0", "simple", 64, pseudo=0)
    params = det.load_params("random")
    pics = (rng.random((7, 64, 64, 3)) * 255).astype(np.uint8)
    host = BatchedDetector(det, params, 4)
    feats = host.features(pics)
    method = get_method("patchcore+")
    cfg = host.config({"num_iters": 2, "sinkhorn_iters": 10}, method)
    state = host.calibrated_state(host.fit(feats[:2]), cfg)  # calibrated under cfg
    got = host.score(state, feats[2:], method, cfg, online={})
    want = score_features(det, state, feats[2:], cfg, 4)
    np.testing.assert_allclose(got.image_scores, np.asarray(want.image_scores), rtol=1e-5)
    scale = np.abs(np.asarray(want.maps)).max()
    np.testing.assert_allclose(got.maps, np.asarray(want.maps), rtol=1e-5, atol=1e-5 * scale)
    for name, value in want.diagnostics._asdict().items():
        np.testing.assert_allclose(got.diagnostics[name], np.asarray(value), rtol=1e-5, atol=1e-7)
    # The halves the calibration error reads are the two passes' own patch scores.
    m = det.extractor.grid[0] * det.extractor.grid[1]
    assert got.halves["host"].shape == got.halves["refined"].shape == (5, m)
    # The refinement check's decision is honoured: host z-scores alone when it is off.
    off = state._replace(calibration=state.calibration._replace(refined_on=np.float32(0.0)))
    host_only = host.score(off, feats[2:], method, cfg, online={})
    c = state.calibration
    z = (got.halves["host"] - float(c.host_loc)) / float(c.host_scale)
    np.testing.assert_allclose(host_only.image_scores, z.max(axis=1), rtol=1e-5, atol=1e-6)
