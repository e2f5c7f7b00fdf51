"""The unlabelled support check: its p-value, its decision, its reference and predict's report."""

import itertools
import json
import math

import numpy as np
import pytest
from helpers import FAST_FIT, FAST_REFINE, demo_category
from PIL import Image

from protorefine_jax import calibration, threshold
from protorefine_jax.app import deploy
from protorefine_jax.config import RefineConfig


def _enumerated_p_value(above: int, scored: int, references: int) -> float:
    """P(E >= above) by enumerating which of the n + N ranks the scored draws take."""
    total = hits = 0
    for ranks in itertools.combinations(range(scored + references), scored):
        top_ref = max(set(range(scored + references)) - set(ranks))
        total += 1
        hits += sum(r > top_ref for r in ranks) >= above
    return hits / total


@pytest.mark.parametrize("scored,references", [(1, 1), (3, 2), (4, 5), (6, 3)])
def test_exceedance_p_value_equals_the_enumerated_rank_law(scored, references):
    for above in range(scored + 1):
        assert threshold.exceedance_p_value(above, scored, references) == pytest.approx(
            _enumerated_p_value(above, scored, references), abs=1e-12
        )


def test_exceedance_p_value_against_simulation_at_larger_counts():
    rng = np.random.default_rng(0)
    n, big_n, e = 40, 12, 7
    draws = 200_000
    refs = rng.random((draws, big_n)).max(axis=1)
    counts = rng.binomial(n, 1.0 - refs)  # given the largest reference, each draw is above it
    sim = float(np.mean(counts >= e))
    se = math.sqrt(sim * (1 - sim) / draws)
    assert abs(threshold.exceedance_p_value(e, n, big_n) - sim) < 4 * se
    # Thousands of images: log space, no overflow. All n above all N: 1 / C(n + N, n).
    assert threshold.exceedance_p_value(3000, 3000, 20) == pytest.approx(1 / math.comb(3020, 20))
    # Two thirds above: about P(largest reference below its 1/3 quantile) = 3^-20.
    assert threshold.exceedance_p_value(2000, 3000, 20) == pytest.approx(3.0**-20, rel=0.2)


def test_exceedance_p_value_refuses_impossible_counts():
    for args in ((3, 2, 5), (-1, 2, 5), (1, 2, 0)):
        with pytest.raises(ValueError, match="references >= 1"):
            threshold.exceedance_p_value(*args)


def test_typical_check_warns_on_a_shift_and_not_on_the_same_law():
    rng = np.random.default_rng(1)
    support = rng.normal(size=(3, 5))  # 3 images x (original + 4 views)
    same = threshold.typical_check(support, rng.normal(size=200))
    assert not same.warns and same.references == 15 and same.scored == 200
    assert same.support_max == pytest.approx(support.max())
    shifted = threshold.typical_check(support, rng.normal(size=200) + 3.0)
    assert shifted.warns and shifted.p_value < 1e-6 and "warning:" in shifted.describe()
    assert "--calibrate_on_stream" in shifted.describe()
    # One image above everything is no evidence: p = 1 / (N + 1) = 1/16. Two are (2/272).
    one = threshold.typical_check(support, np.array([10.0]))
    assert one.above == 1 and not one.warns and one.p_value == pytest.approx(1 / 16)
    two = threshold.typical_check(support, np.array([10.0, 11.0]))
    assert two.warns and two.p_value == pytest.approx(2 / (16 * 17))
    # Most images above only through a minority of defective ones: the median decides.
    mixed = np.concatenate([rng.normal(size=150), rng.normal(size=50) + 5.0])
    assert not threshold.typical_check(support, mixed).warns
    assert threshold.typical_check(support, mixed).to_dict()["warns"] is False


def test_typical_check_names_bad_input():
    with pytest.raises(ValueError, match="support units"):
        threshold.typical_check([], [1.0])
    with pytest.raises(ValueError, match="scored images"):
        threshold.typical_check([1.0], [np.nan])
    with pytest.raises(ValueError, match="level"):
        threshold.typical_check([1.0], [1.0], level=1.5)


def test_support_typical_is_the_quantile_of_the_deployed_patch_scores():
    rng = np.random.default_rng(2)
    host = rng.gamma(2.0, size=(2, 3, 16))
    refined = rng.gamma(2.0, size=(2, 3, 16))
    refined[1, 2, :4] = np.nan  # a refined unit the budget left out keeps the host's score
    cal = calibration.ScoreCalibration(1.5, 0.7, 2.0, 1.2, 1.0)
    held = calibration.HeldOut(host, refined)
    fused = calibration.support_image_scores(held, RefineConfig(), cal).typical
    z_h, z_r = (host - 1.5) / 0.7, (refined - 2.0) / 1.2
    want = np.quantile(np.where(np.isnan(z_r), z_h, np.maximum(z_h, z_r)), 0.1, axis=-1)
    np.testing.assert_allclose(fused, want, rtol=1e-12)
    assert fused.shape == (2, 3) and calibration.TYPICAL_QUANTILE == 0.1
    off = calibration.support_image_scores(held, RefineConfig(), cal._replace(refined_on=0.0))
    np.testing.assert_allclose(off.typical, np.quantile(z_h, 0.1, axis=-1), rtol=1e-12)
    host_only = RefineConfig(use_refinement=False)
    raw = calibration.support_image_scores(held, host_only, None).typical
    np.testing.assert_allclose(raw, np.quantile(host, 0.1, axis=-1), rtol=1e-12)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    demo = demo_category(tmp_path_factory)
    out = tmp_path_factory.mktemp("models") / "m"
    s = deploy.FitSettings(
        support_dir=str(demo / "train/good"),
        out=str(out),
        export=True,
        refine=FAST_REFINE,
        **FAST_FIT,
    )
    return demo, out, deploy.fit_model(s, log=lambda _: None)


def _predict(model, images, out, **kw):
    lines: list[str] = []
    s = deploy.PredictSettings(
        model=str(model), images=str(images), out=str(out), batch_size=4, progress=False, **kw
    )
    return deploy.predict(s, log=lines.append), lines


def test_predict_reports_the_support_check_in_every_runtime(fitted, tmp_path):
    demo, model, meta = fitted
    reference = meta["threshold_calibration"]["typical"]
    assert len(reference) == 3 * (1 + calibration.VIEWS)  # 3 images, each with its views
    # The support images themselves score low where they are normal: no warning.
    quiet, lines = _predict(model, demo / "train/good", tmp_path / "same")
    check = quiet["support_check"]
    assert check["references"] == len(reference) and check["scored"] == 3
    assert check["support_max"] == pytest.approx(max(reference)) and not check["warns"]
    assert any(line.startswith("support check: ") for line in lines)
    # Parts unlike the support images: inverted and noisy grey levels, many of them.
    moved = tmp_path / "moved"
    moved.mkdir()
    rng = np.random.default_rng(0)
    for p in sorted((demo / "test").rglob("*.png")):
        img = 255 - np.asarray(Image.open(p).convert("RGB"), np.int16)
        for v in range(3):
            noisy = np.clip(img + rng.normal(0, 30, img.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(moved / f"{p.parent.name}_{p.stem}_{v}.png")
    runs = {}
    for runtime in ("library", "export"):
        summary, lines = _predict(model, moved, tmp_path / runtime, runtime=runtime)
        runs[runtime] = summary["support_check"]
        assert runs[runtime]["warns"], runs[runtime]
        assert any(line.startswith("warning: these images differ") for line in lines)
        report = (tmp_path / runtime / "report.html").read_text()
        assert "warning: these images differ" in report
        saved = json.loads((tmp_path / runtime / "summary.json").read_text())
        assert saved["support_check"]["warns"] is True
    # Same typical scores from the exported program's patch scores as from the library's.
    assert runs["export"]["above"] == runs["library"]["above"]
    assert runs["export"]["median"] == pytest.approx(runs["library"]["median"], rel=1e-3, abs=1e-4)
    # The stream method adapts its statistics: the check says it did not run.
    stream, _ = _predict(model, moved, tmp_path / "stream", calibrate_on_stream=True)
    assert "not run" in stream["support_check"]["note"]
