"""WinCLIP / WinCLIP+ scoring against numpy loops; detect end to end on a tiny CLIP."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TraceCounter
from test_clip_towers import SPEC, init_params

from protorefine_jax import RefineConfig
from protorefine_jax.clip import winclip
from protorefine_jax.clip.towers import MultiscaleFeatures

GRID = SPEC.grid_size  # 4 x 4
E = SPEC.embed_dim
D = SPEC.vision_width  # unprojected patch tokens (the default, as anomalib)


def _windows(k, h=4, w=4):
    return [
        [(i + a) * w + (j + b) for a in range(k) for b in range(k)]
        for i in range(h - k + 1)
        for j in range(w - k + 1)
    ]


def _harmonic(scores, k):
    out = np.zeros(16)
    wins = _windows(k)
    for p in range(16):
        cover = np.array([scores[r] for r in range(len(wins)) if p in wins[r]], np.float64)
        out[p] = len(cover) / np.sum(1 / cover)
    return out.reshape(GRID)


def _prob(emb, text, t=0.07):
    emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    text = text / np.linalg.norm(text, axis=-1, keepdims=True)
    logits = emb @ text.T / t
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    return (p / p.sum(-1, keepdims=True))[..., 1]


def _cos_dist(q, bank):
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    bank = bank / np.linalg.norm(bank, axis=-1, keepdims=True)
    return ((1 - q @ bank.T) / 2).min(-1)


def random_features(rng, b, base=None, noise=1.0):
    """Features near `base` (or random) with the shapes of a 4x4 grid, windows 2 and 3.

    Patch tokens are `D` wide (unprojected, the default), the rest `E` wide.
    """
    shapes = [(b, 1, E), (b, 16, D), (b, 9, E), (b, 4, E)]
    parts = [rng.standard_normal(s) for s in shapes]
    if base is not None:
        parts = [
            p[:1] * 0 + np.asarray(x)[:1] + noise * p for p, x in zip(parts, base, strict=True)
        ]
    image, patches, w2, w3 = (np.asarray(p, np.float32) for p in parts)
    return MultiscaleFeatures(
        jnp.asarray(image[:, 0]), jnp.asarray(patches), (jnp.asarray(w2), jnp.asarray(w3))
    )


def _as_list(f):
    return [np.asarray(f.image)[:, None], np.asarray(f.patches), *map(np.asarray, f.windows)]


@pytest.fixture
def setup(rng):
    support = random_features(rng, 2)
    queries = random_features(rng, 3, base=_as_list(support), noise=0.5)
    text = rng.standard_normal((2, E)).astype(np.float32)
    return support, queries, jnp.asarray(text)


def test_anomaly_probability(rng):
    emb = rng.standard_normal((5, E)).astype(np.float32)
    text = rng.standard_normal((2, E)).astype(np.float32)
    got = winclip.anomaly_probability(jnp.asarray(emb), jnp.asarray(text), 0.07)
    np.testing.assert_allclose(got, _prob(emb, text), rtol=1e-4, atol=1e-6)


def test_zero_shot_matches_numpy(setup):
    _, queries, text = setup
    cfg = winclip.winclip_config(clip=SPEC, image_size=None)
    out = winclip.score(queries, None, text, cfg)
    t = np.asarray(text)
    for b in range(3):
        s0 = _prob(np.asarray(queries.image[b]), t)
        g2 = _harmonic(_prob(np.asarray(queries.windows[0][b]), t), 2)
        g3 = _harmonic(_prob(np.asarray(queries.windows[1][b]), t), 3)
        grid = 3 / (1 / s0 + 1 / g2 + 1 / g3)
        np.testing.assert_allclose(out.zero_shot_scores[b], s0, rtol=1e-4)
        np.testing.assert_allclose(out.zero_shot_grid[b], grid, rtol=1e-4)
        np.testing.assert_allclose(out.maps[b], grid, rtol=1e-4)
        np.testing.assert_allclose(out.image_scores[b], s0, rtol=1e-4)
    np.testing.assert_array_equal(out.few_shot_grid, 0.0)


def _few_shot_numpy(q, memories, b):
    """Plain WinCLIP's few-shot grid of query `b` against per-scale memories (numpy)."""
    fs = [_cos_dist(q[1][b], memories[0]).reshape(GRID)]
    for k, i in ((2, 2), (3, 3)):
        fs.append(_harmonic(_cos_dist(q[i][b], memories[i - 1]), k))
    return np.mean(fs, axis=0)


def test_winclip_few_shot_full_memory_matches_numpy(setup):
    """Plain WinCLIP (default) scores against EVERY support token and window, as anomalib:
    the coreset ratio given to `build_banks` does not change it."""
    support, queries, text = setup
    cfg = winclip.winclip_config(use_refinement=False, clip=SPEC, image_size=None)
    assert cfg.plain_memory == "full" and not cfg.project_patches
    banks = winclip.build_banks(support, alpha=0.25)
    assert [b.prototypes.shape for b in banks] == [(8, D), (4, E), (2, E)]  # coresets
    assert [f.shape for f in banks.full] == [(32, D), (18, E), (8, E)]  # every row
    out = winclip.score(queries, banks, text, cfg)
    sup = _as_list(support)
    full = [sup[i].reshape(-1, sup[i].shape[-1]) for i in (1, 2, 3)]
    q = _as_list(queries)
    for b in range(3):
        fs = _few_shot_numpy(q, full, b)
        np.testing.assert_allclose(out.few_shot_grid[b], fs, rtol=1e-4, atol=1e-6)
        zs = np.asarray(out.zero_shot_grid[b])
        np.testing.assert_allclose(out.maps[b], (zs + fs) / 2, rtol=1e-4, atol=1e-6)
        s0 = float(out.zero_shot_scores[b])
        np.testing.assert_allclose(out.image_scores[b], (s0 + fs.max()) / 2, rtol=1e-4)  # Eq. 9


def test_winclip_coreset_option_and_winclip_plus_use_the_coresets(setup):
    support, queries, text = setup
    banks = winclip.build_banks(support, alpha=0.25)
    coresets = [np.asarray(b.prototypes) for b in banks]
    q = _as_list(queries)
    cfg = winclip.winclip_config(
        use_refinement=False, clip=SPEC, image_size=None, plain_memory="coreset"
    )
    out = winclip.score(queries, banks, text, cfg)
    full = winclip.score(queries, banks, text, cfg.replace(plain_memory="full"))
    for b in range(3):
        want = _few_shot_numpy(q, coresets, b)
        np.testing.assert_allclose(out.few_shot_grid[b], want, rtol=1e-4, atol=1e-6)
    # A coreset is a subset: distances can only grow, and at alpha 0.25 they do.
    assert np.all(np.asarray(out.few_shot_grid) >= np.asarray(full.few_shot_grid) - 1e-6)
    assert not np.allclose(out.few_shot_grid, full.few_shot_grid, atol=1e-4)
    # WinCLIP+ refines the coresets whatever plain_memory says.
    plus = winclip.winclip_config(clip=SPEC, image_size=None, num_iters=2)
    a = winclip.score(queries, banks, text, plus)
    c = winclip.score(queries, banks, text, plus.replace(plain_memory="coreset"))
    np.testing.assert_array_equal(a.few_shot_grid, c.few_shot_grid)
    explicit = tuple(b.prototypes for b in banks)  # a plain sequence is used as given
    np.testing.assert_allclose(
        winclip.score(queries, explicit, text, plus).few_shot_grid, a.few_shot_grid, atol=1e-6
    )


def test_winclip_few_shot_matches_numpy_at_alpha_one(setup):
    support, queries, text = setup
    cfg = winclip.winclip_config(use_refinement=False, clip=SPEC, image_size=None)
    banks = winclip.build_banks(support, alpha=1.0)
    assert [b.prototypes.shape for b in banks] == [(32, D), (18, E), (8, E)]
    np.testing.assert_allclose(jnp.linalg.norm(banks[2].prototypes, axis=-1), 1.0, rtol=1e-5)
    for memory in ("full", "coreset"):
        out = winclip.score(queries, banks, text, cfg.replace(plain_memory=memory))
        sup = _as_list(support)
        full = [sup[i].reshape(-1, sup[i].shape[-1]) for i in (1, 2, 3)]
        for b in range(3):
            fs = _few_shot_numpy(_as_list(queries), full, b)
            np.testing.assert_allclose(out.few_shot_grid[b], fs, rtol=1e-4, atol=1e-6)


def test_detect_end_to_end_tiny_clip(rng):
    params = init_params(SPEC)
    images = rng.uniform(0, 255, (4, 64, 64, 3)).astype(np.float32)
    cfg = winclip.winclip_config(use_refinement=False, clip=SPEC)
    support = winclip.extract_multiscale(params, images[:2], cfg)
    assert support.patches.shape == (2, 16, D)  # unprojected by default
    banks = winclip.build_banks(support, 0.5)
    text = jnp.asarray(rng.standard_normal((2, E)), jnp.float32)
    counter = TraceCounter(winclip.detect.__wrapped__)
    detect = jax.jit(counter)
    out = detect(params, banks, text, images[2:], cfg)
    assert out.image_scores.shape == (2,) and out.maps.shape == (2, 64, 64)
    assert np.all(out.few_shot_scores > 1e-4)
    direct = winclip.detect(params, banks, text, images[2:], cfg)
    np.testing.assert_allclose(out.image_scores, direct.image_scores, rtol=1e-6)
    # Same shapes: no retrace. Support images score ~0 against the full memory (alpha 0.5).
    again = detect(params, banks, text, images[:2], cfg)
    assert counter.count == 1
    np.testing.assert_allclose(again.few_shot_scores, 0.0, atol=1e-6)


def test_config_errors(setup):
    support, queries, text = setup
    with pytest.raises(ValueError, match="cosine"):
        winclip.WinClipConfig(refine=RefineConfig(distance="sqeuclidean"), clip=SPEC)
    with pytest.raises(ValueError, match="does not fit"):
        winclip.winclip_config(clip=SPEC, window_sizes=(5,))
    with pytest.raises(ValueError, match="plain_memory must be 'full'.*'coreset'.*'all'"):
        winclip.winclip_config(clip=SPEC, plain_memory="all")
    cfg = winclip.winclip_config(use_refinement=False, clip=SPEC)
    banks = winclip.build_banks(support, 1.0)
    with pytest.raises(ValueError, match="expected 3 banks"):
        winclip.score(queries, banks[:2], text, cfg)


@pytest.mark.parametrize("use_refinement", [False, True])
def test_score_matmuls_run_in_float32_unless_tf32(setup, use_refinement):
    """JAX's default matmul precision on NVIDIA GPUs is TF32: every product of `score`
    (text cosines, few-shot distances, refinement, map einsum) must ask for HIGHEST."""
    support, queries, text = setup
    banks = winclip.build_banks(support, alpha=1.0)
    for precision, want in (("float32", "HIGHEST"), ("tf32", "DEFAULT")):
        cfg = winclip.winclip_config(
            use_refinement=use_refinement, clip=SPEC, precision=precision, num_iters=2
        )
        assert cfg.image_size is not None  # the map einsum is part of the program
        for b in (None, banks):
            hlo = winclip.score.lower(queries, b, text, cfg).as_text()
            dots = re.findall(r"stablehlo\.dot_general[^\n]*", hlo)
            assert dots, "no products found in the lowered program"
            wrong = [d for d in dots if f"precision = [{want}, {want}]" not in d]
            assert not wrong, (precision, wrong)


def test_banks_hold_unit_rows_of_each_scale(setup):
    support, _, _ = setup
    banks = winclip.build_banks(support, alpha=1.0)
    scales = (support.patches, *support.windows)
    assert len(banks) == len(scales)
    for bank, feats in zip(banks, scales, strict=True):
        rows = np.asarray(feats, np.float64).reshape(-1, feats.shape[-1])
        ref = rows / np.linalg.norm(rows, axis=-1, keepdims=True)
        got = np.asarray(bank.prototypes, np.float64)
        np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, rtol=1e-5, atol=1e-6)
        # alpha=1 keeps every row: the bank is the normalised support, reordered.
        np.testing.assert_allclose(got, ref[np.asarray(bank.indices)], rtol=1e-5, atol=1e-6)


def test_score_does_not_recompile_for_new_floats(setup, monkeypatch):
    support, queries, text = setup
    banks = winclip.build_banks(support, alpha=1.0)
    calls = []
    original = winclip.few_shot_query
    monkeypatch.setattr(
        winclip, "few_shot_query", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    jax.clear_caches()
    cfg = winclip.winclip_config(clip=SPEC, num_iters=2)
    winclip.score(queries, banks, text, cfg)
    assert len(calls) == 1
    winclip.score(queries, banks, text, cfg.replace(temperature=0.05))
    winclip.score(queries, banks, text, cfg.replace(refine=cfg.refine.replace(lam=0.5)))
    assert len(calls) == 1
    winclip.score(queries, banks, text, cfg.replace(refine=cfg.refine.replace(num_iters=3)))
    assert len(calls) == 2
