"""experiments.research.fusion_choice on a hand-computed tiny cell (no real data)."""

import numpy as np
import pytest

from experiments.research import fusion_choice as fc
from protorefine_jax import calibration

# Held-out support quadrants (rows). Host: median 2, IQR 3 - 1 = 2, ceiling
# (4 - 2) / 2 = 1. Refined: median 20, IQR 20, ceiling (40 - 20) / 20 = 1 (a tie).
HELD_HOST = np.array([[0.0, 1, 2, 3, 4], [0, 1, 2, 3, 4]], np.float32)
HELD_REF = 10 * HELD_HOST
# Three test images x 4 patches; labels: normal, anomalous, normal.
TEST_HOST = np.array([[2.0, 6, 4, 2], [2, 3, 2, 2], [2, 2, 2, 2]], np.float32)
TEST_REF = np.array([[20.0, 30, 20, 20], [20, 100, 20, 20], [50, 20, 20, 20]], np.float32)
LABELS = np.array([0, 1, 0])
# max_j z_h = (6-2)/2 = 2, (3-2)/2 = 0.5, 0;  max_j z_r = 0.5, (100-20)/20 = 4, 1.5.
FUSED = np.array([2.0, 4.0, 1.5])
FROM_REF = np.array([False, True, True])


def cell():
    return {
        "test_host05": TEST_HOST,
        "test_ref": TEST_REF,
        "region_host05": HELD_HOST,
        "region_ref": HELD_REF,
    }


def test_image_sides_and_shares_match_the_hand_computation():
    cal = calibration.statistics(HELD_HOST.ravel(), HELD_REF.ravel())
    np.testing.assert_allclose(
        [cal.host_loc, cal.host_scale, cal.refined_loc, cal.refined_scale],
        [2, 2, 20, 20],
        rtol=1e-6,
    )
    scores, from_ref = fc.image_sides(TEST_HOST, TEST_REF, cal)
    np.testing.assert_allclose(scores, FUSED, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(from_ref, FROM_REF)
    share_all, share_normal = fc.refined_share(from_ref, LABELS)
    assert share_all == pytest.approx(2 / 3, abs=1e-12)
    assert share_normal == pytest.approx(1 / 2, abs=1e-12)


def test_fit_choice_takes_the_strictly_lower_ceiling():
    assert fc.fit_choice(HELD_HOST, HELD_REF) == "host"  # equal ceilings: host
    lower = HELD_REF.copy()
    lower[:, -1] = 35  # refined ceiling (35 - 20) / 20 = 0.75 < 1
    assert fc.fit_choice(HELD_HOST, lower) == "ref"
    higher = HELD_REF.copy()
    higher[:, -1] = 100  # 4 > 1
    assert fc.fit_choice(HELD_HOST, higher) == "host"


def test_optimum_ties_within_the_tolerance():
    assert fc.optimum(90.0, 90.1, 0.1) == "tie"
    assert fc.optimum(90.0, 90.2, 0.1) == "ref"
    assert fc.optimum(90.3, 90.0, 0.1) == "host"


def test_analyse_cell_end_to_end():
    row = fc.analyse_cell(cell(), LABELS, k=1, tie=0.1)
    # Host image scores 6, 3, 2: the anomaly beats one of two normals -> 50.
    assert row["auroc_host"] == pytest.approx(50.0)
    assert row["auroc_ref"] == pytest.approx(100.0)  # 30, 100, 50
    assert row["auroc_calibrated"] == pytest.approx(100.0)  # 2, 4, 1.5
    assert row["optimum"] == "ref"
    assert row["majority_all"] == "ref"
    assert row["majority_normal"] == "host"  # exactly 1/2 is not a majority
    assert row["fit_choice"] == "host"
    assert row["auroc_fit_choice"] == pytest.approx(50.0)
    s = fc.summarise([row])
    assert (s["majority_all_match"], s["fit_choice_match"], s["ties"]) == (1, 0, 0)
    assert s["calibrated_minus_oracle_worst"] == pytest.approx(0.0)
    assert s["fit_choice_minus_oracle_worst"] == pytest.approx(-50.0)


def test_refined_share_rejects_mismatched_or_all_anomalous_labels():
    with pytest.raises(ValueError, match="one side per test image"):
        fc.refined_share(FROM_REF, LABELS[:2])
    with pytest.raises(ValueError, match="at least one normal image"):
        fc.refined_share(FROM_REF, np.ones(3, int))
