"""The detectors package: the README's compose snippets, the interface, the defaults."""

import re
from pathlib import Path

import jax
import numpy as np
import pytest

from protorefine_jax import RefineConfig, refine_and_score
from protorefine_jax.bank import uses_wide_ridge
from protorefine_jax.calibration import ScoreCalibration
from protorefine_jax.detectors import (
    DetectorState,
    PatchCore,
    bank_degenerate,
    bank_size,
    describe_banks,
)
from protorefine_jax.detectors import patchcore as patchcore_lib

REPO = Path(__file__).resolve().parents[1]


def readme_blocks(heading: str) -> list[str]:
    """The ```python blocks of one README section, verbatim."""
    text = (REPO / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_compose_snippets_run_as_written():
    blocks = readme_blocks("Compose PatchCore+ in your own code")
    assert len(blocks) == 2
    rng = np.random.default_rng(0)
    support_images = rng.integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)
    query_images = rng.integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    ns = {"support_images": support_images, "query_images": query_images}
    exec(compile(blocks[0], "README.md", "exec"), ns)
    out, host = ns["out"], ns["host"]
    assert out.image_scores.shape == (2,)
    assert out.maps.shape == (2, 256, 256)
    assert np.all(np.isfinite(np.asarray(out.maps)))
    assert host.image_scores.shape == (2,)
    # The detector is the library's composition: same numbers as by hand.
    det, params, state = ns["detector"], ns["params"], ns["state"]
    feats = det.features(params, query_images)
    ref = refine_and_score(state.banks[0].prototypes, feats, det.config(), state.calibration)
    np.testing.assert_allclose(out.image_scores, ref.image_scores, rtol=1e-6, atol=1e-6)
    # The second block: the refiner on the reader's own features.
    f = np.asarray(det.features(params, support_images))
    ns2 = {"my_support_features": f, "my_query_features": np.asarray(feats)}
    exec(compile(blocks[1], "README.md", "exec"), ns2)
    assert ns2["out"].maps.shape == (2, 256, 256)


def test_defaults_live_in_the_detector_module():
    det = PatchCore.create("efficientnet_lite0")
    assert det.alpha == patchcore_lib.ALPHA
    assert det.extractor.aggregation == patchcore_lib.AGGREGATION["efficientnet_lite0"]
    assert PatchCore.create("wide_resnet50_2").extractor.aggregation == "official"
    cfg = det.config()
    assert cfg.lam == RefineConfig().lam and cfg.grid_shape == det.extractor.grid
    assert det.config(use_refinement=False, lam=0.1).lam == 0.1


def test_state_is_one_kind_for_every_detector():
    det = PatchCore(PatchCore.create("efficientnet_lite0", image_size=64).extractor, alpha=0.5)
    feats = np.abs(np.random.default_rng(1).standard_normal((2, 64, 16), np.float32))
    state = det.fit_features(feats)
    assert isinstance(state, DetectorState) and len(state.banks) == 1
    # PatchCore+'s support-set calibration (issue 14) lives in the state.
    assert isinstance(state.calibration, ScoreCalibration) and state.context is None
    assert det.fit_features(feats, calibrate=False).calibration is None
    assert bank_size(state) == state.banks[0].prototypes.shape[0] == 64
    assert bank_degenerate(state) == bool(state.banks[0].degenerate)
    assert describe_banks(state) == state.banks[0].describe()
    # A pytree: it crosses jit boundaries and tree maps.
    assert len(jax.tree_util.tree_leaves(state)) >= 2


def test_ridge_rule_is_one_function():
    assert uses_wide_ridge(152, 152) and not uses_wide_ridge(151, 152)
    assert bool(jax.jit(uses_wide_ridge)(np.int32(200), 152))


def test_winclip_refuses_the_online_variant():
    pytest.importorskip("transformers")
    from protorefine_jax.clip.spec import VIT_B_16_PLUS_240
    from protorefine_jax.detectors.winclip import WinClip, default_alpha

    det = WinClip(VIT_B_16_PLUS_240, tokenizer=None)
    assert default_alpha("mpdd") == 0.2 and default_alpha("folder") == 0.5
    assert det.config().refine.lam == 0.1 and det.config().refine.distance == "cosine"
    with pytest.raises(ValueError, match="PatchCore\\+ only"):
        det.score_stream(DetectorState(()), None, None, capacity=1, add_per_query=1)
    with pytest.raises(ValueError, match="fit with a category"):
        det.score_features(DetectorState(()), None, det.config())


def test_patchcore_scores_check_host_features_and_flag_device_ones():
    det = PatchCore.create("efficientnet_lite0", "simple", 64)
    (gh, gw), c = det.extractor.grid, det.extractor.feature_dim
    rng = np.random.default_rng(0)
    support = rng.standard_normal((2, gh * gw, c)).astype(np.float32)
    state = det.fit_features(support, alpha=0.5, calibrate=False)
    cfg = det.config(num_iters=2, calibrated=False)
    bad = rng.standard_normal((3, gh * gw, c)).astype(np.float32)
    bad[1, 2, 0] = np.nan
    # Host features: the refiner's host check names the bad value (the offline
    # and the online path; before, both were moved to the device unchecked).
    with pytest.raises(ValueError, match=r"NaN or infinite values \(first at index \(1, 2, 0\)\)"):
        det.score_features(state, bad, cfg)
    with pytest.raises(ValueError, match="NaN or infinite"):
        det.score_stream(state, bad, cfg, capacity=8, add_per_query=2)
    # Device features are not read back: the bad query is flagged instead.
    out = det.score_features(state, jax.numpy.asarray(bad), cfg)
    assert np.asarray(out.inputs_ok).tolist() == [True, False, True]


def test_state_records_the_config_its_calibration_was_measured_under():
    det = PatchCore.create("efficientnet_lite0", "simple", 64)
    (gh, gw), c = det.extractor.grid, det.extractor.feature_dim
    rng = np.random.default_rng(1)
    support = rng.standard_normal((2, gh * gw, c)).astype(np.float32)
    query = rng.standard_normal((1, gh * gw, c)).astype(np.float32)
    fit_cfg = det.config(lam=0.5, num_iters=2)
    state = det.fit_features(support, alpha=0.5, config=fit_cfg)
    assert state.calibrated_under == fit_cfg
    # The calibration is the one of the fit's settings, not of the defaults.
    want = det.calibrate(support, fit_cfg, alpha=0.5)
    np.testing.assert_allclose(np.asarray(state.calibration), np.asarray(want), rtol=1e-6)
    # Same refinement: scores (map rendering and the switches are free to differ).
    det.score_features(state, query, fit_cfg.replace(blur_sigma=2.0))
    det.score_features(state, query, fit_cfg.replace(use_refinement=False))
    det.score_features(state, query, fit_cfg.replace(calibrated=False))
    # Other refinement settings: refused, the differences named.
    with pytest.raises(ValueError, match=r"lam: 0\.5 -> 0\.3; num_iters: 2 -> 10"):
        det.score_features(state, query, det.config())
