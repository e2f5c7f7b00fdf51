"""WinCLIP+ few-shot scores are the core's refine_and_score scores, aggregated per scale."""

import numpy as np
from test_clip_winclip import GRID, SPEC, _as_list, _harmonic, random_features

from protorefine_jax import refine_and_score
from protorefine_jax.clip import winclip


def test_winclip_plus_uses_refine_and_score(rng):
    support = random_features(rng, 2)
    queries = random_features(rng, 3, base=_as_list(support), noise=0.5)
    text = rng.standard_normal((2, SPEC.embed_dim)).astype(np.float32)
    cfg = winclip.winclip_config(clip=SPEC, image_size=(64, 64), num_iters=3)
    banks = winclip.build_banks(support, alpha=0.5)
    assert [b.prototypes.shape[0] for b in banks] == [16, 9, 4]
    out = winclip.score(queries, banks, text, cfg)
    assert out.maps.shape == (3, 64, 64) and out.patch_scores.shape == (3, 16)
    assert np.all(np.isfinite(out.maps)) and out.diagnostics.marginal_error.shape == (3,)
    # Per scale, the few-shot grid is the core's refine_and_score patch scores, aggregated.
    grids = []
    for s, (feats, bank) in enumerate(zip(winclip.scale_features(queries), banks, strict=True)):
        shape = GRID if s == 0 else (4 - s, 4 - s)
        core_cfg = cfg.refine.replace(grid_shape=shape, image_size=None)
        ps = np.asarray(refine_and_score(bank.prototypes, feats, core_cfg).patch_scores)
        grids.append([ps[b].reshape(GRID) if s == 0 else _harmonic(ps[b], s + 1) for b in range(3)])
    np.testing.assert_allclose(out.few_shot_grid, np.mean(grids, axis=0), rtol=2e-3, atol=1e-5)
    # WinCLIP+ moves the scores away from plain WinCLIP's nearest-prototype distances.
    plain_cfg = cfg.replace(refine=cfg.refine.replace(use_refinement=False))
    plain = winclip.score(queries, banks, text, plain_cfg)
    assert not np.allclose(plain.few_shot_grid, out.few_shot_grid, atol=1e-3)
