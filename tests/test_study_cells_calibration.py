"""experiments.research.study_cells: calibration_study's context hold-outs and alike supports.

Small random features on the study's 32 x 32 grid; no real data.
"""

import numpy as np
import pytest

from experiments.research import study_cells
from protorefine_jax import RefineConfig, calibration, refine_and_score

GRID = (32, 32)  # calibration_study.GRID (importing it would define its flags)
ALPHA = study_cells.ALPHA
K, C, V = 2, 8, 1
M = GRID[0] * GRID[1]
CFG = RefineConfig(grid_shape=None, image_size=None)


@pytest.fixture(scope="module")
def support():
    rng = np.random.default_rng(0)
    sup = rng.normal(size=(K, M, C)).astype(np.float32)
    views = (sup[:, None] + 0.1 * rng.normal(size=(K, V, M, C))).astype(np.float32)
    return sup, views


def test_context_units_are_each_quadrant_refined_inside_its_whole_image(support):
    sup, views = support
    got = study_cells.context_units(sup, views, CFG, ALPHA, GRID)
    assert got.shape == (K, 1 + V, M)
    banks, _ = calibration.holdouts(sup, ALPHA, GRID, views)
    run_cfg = calibration._holdout_config(K * M, C, ALPHA, CFG)
    splits = calibration.holdout_splits(K, GRID)
    quarter = M // 4
    for j, (_, held) in enumerate(splits):
        i, q = divmod(j, 4)
        whole = np.concatenate([sup[i][None], views[i]])  # the original, then its view
        # The public batched pipeline, on the whole images, then the quadrant's patches.
        ref = np.asarray(refine_and_score(banks[j], whole, run_cfg).patch_scores)
        np.testing.assert_allclose(
            got[i, :, q * quarter : (q + 1) * quarter], ref[:, held - i * M], rtol=2e-4, atol=1e-4
        )
    # A quadrant refined alone (the shipped hold-out) is a different query: the
    # numbers must differ, or the experiment measures nothing.
    _, alone = calibration.held_out_units(sup, ALPHA, CFG, GRID, views=views)
    assert np.max(np.abs(alone - got)) > 1e-3


def test_alike_support_is_the_seed_image_and_its_nearest_pool_images():
    rng = np.random.default_rng(1)
    names = [f"train/good/{i:03d}.png" for i in range(6)]
    centres = np.array([0.0, 10.0, 1.0, 30.0, 2.5, 11.0])  # image means along one axis
    train = {
        n: (c + 0.01 * rng.normal(size=(4, 3))).astype(np.float32)
        for n, c in zip(names, centres, strict=True)
    }
    feats = {"train": train, "pool": [f"/data/x/{n}" for n in names]}
    random_names = study_cells.support_names(feats, 3, 4)
    alike = study_cells.support_names(feats, 3, 4, alike=True)
    assert study_cells.support_names(feats, 1, 4, alike=True) == random_names[:1]
    assert alike[0] == random_names[0]
    anchor = centres[names.index(alike[0])]
    want = [names[i] for i in np.argsort(np.abs(centres - anchor), kind="stable")[:3]]
    assert alike == want
