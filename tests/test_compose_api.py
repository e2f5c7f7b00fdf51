"""The compose API a JAX researcher would guess (issue 25 item 5).

One bank type everywhere, `calibrate` reading the grid from the config, and
the building blocks exported: composing them by hand gives `score_query`'s
numbers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import lowrank_features, subspace

import protorefine_jax as prj
from protorefine_jax import calibration

GRID = (8, 8)
CFG = prj.RefineConfig(num_iters=2, sinkhorn_iters=20, grid_shape=GRID, image_size=(32, 32))


@pytest.fixture(scope="module")
def parts():
    rng = np.random.default_rng(3)
    basis = subspace(rng, 10, 40)
    support = jnp.asarray(lowrank_features(rng, (2, 64, 40), basis))
    queries = jnp.asarray(lowrank_features(rng, (3, 64, 40), basis))
    bank = prj.build_bank(support, alpha=0.25)
    return support, queries, bank


def test_every_entry_point_takes_the_memory_bank_or_its_prototypes(parts):
    support, queries, bank = parts
    want = prj.refine_and_score(bank.prototypes, queries, CFG)
    got = prj.refine_and_score(bank, queries, CFG)
    np.testing.assert_array_equal(got.image_scores, want.image_scores)
    one = prj.score_query(bank, queries[0], CFG)
    np.testing.assert_allclose(one.image_scores, want.image_scores[0], rtol=1e-5, atol=1e-6)
    detect = prj.make_detect(lambda params, x: x)  # "features" are the input itself
    det = detect(None, bank, queries, CFG)
    np.testing.assert_allclose(det.image_scores, want.image_scores, rtol=1e-5, atol=1e-6)
    online = prj.online_refine_and_score(bank, queries, CFG, capacity=8, add_per_query=4)
    assert online.image_scores.shape == (3,)


def test_calibrate_reads_the_grid_from_the_config(parts):
    support, _, _ = parts
    got = prj.calibrate(support, CFG, alpha=0.25)
    want = calibration.statistics(*calibration.held_out_scores(support, 0.25, CFG, GRID))
    for a, b in zip(got, want, strict=True):
        assert float(a) == float(b)
    # An explicit grid serves a config without one, and gives the same statistics.
    loose = CFG.replace(grid_shape=None)
    again = prj.calibrate(support, loose, alpha=0.25, grid_shape=GRID)
    assert [float(x) for x in again] == [float(x) for x in got]


def test_calibrate_names_what_is_missing(parts):
    support, _, _ = parts
    with pytest.raises(ValueError, match="grid_shape"):
        prj.calibrate(support, CFG.replace(grid_shape=None))
    with pytest.raises(TypeError):
        prj.calibrate(support, 0.05, CFG, GRID)  # the old positional form
    with pytest.raises(TypeError, match="alpha and grid_shape are keywords"):
        prj.calibrate(support, 0.05)


def test_building_blocks_compose_to_score_query(parts):
    support, queries, bank = parts
    cal = prj.calibrate(support, CFG, alpha=0.25)
    q = queries[1]

    @jax.jit
    def by_hand(m, f):
        with prj.gram.matmul_precision(CFG):
            system = prj.gram_system(m, f, CFG)
            ref = prj.refine.refine(system, CFG)
            refined = prj.refined_patch_scores(system, ref.w, CFG, ref.refined_sq)
            fused = prj.fuse(prj.base_patch_scores(system, CFG), refined, cal)
        return fused, prj.anomaly_map(fused, CFG)

    fused, amap = by_hand(bank.prototypes, q)
    want = jax.jit(prj.score_query)(bank.prototypes, q, CFG, cal)
    np.testing.assert_allclose(fused, want.patch_scores, rtol=1e-4, atol=1e-4)  # float32 rounding
    np.testing.assert_allclose(amap, want.maps, rtol=1e-4, atol=1e-4)


def test_exports_never_shadow_a_module_of_the_package():
    import importlib
    import inspect

    for name in ("bank", "calibration", "config", "coreset", "gram", "pipeline", "refine"):
        importlib.import_module(f"protorefine_jax.{name}")
        assert inspect.ismodule(getattr(prj, name)), name
    for name in ("scoring", "transport", "threshold", "metrics"):
        importlib.import_module(f"protorefine_jax.{name}")
        assert inspect.ismodule(getattr(prj, name)), name
