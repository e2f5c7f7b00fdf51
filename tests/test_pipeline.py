import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import lowrank_bank_and_queries, lowrank_features, subspace

from protorefine_jax import (
    RefineConfig,
    build_bank,
    make_detect,
    online_refine_and_score,
    refine_and_score,
    score_query,
)
from protorefine_jax import pipeline as pl

CFG = RefineConfig(num_iters=3, sinkhorn_iters=20, image_size=(32, 32))


def data(rng, b=3, m=64, c=48, n=20):
    return tuple(map(jnp.asarray, lowrank_bank_and_queries(rng, b, m, c, n, rank=12)))


@pytest.mark.parametrize(
    "cfg",
    [
        CFG,
        CFG.replace(use_refinement=False),
        CFG.replace(use_transport=False),
        CFG.replace(bank="union"),
        CFG.replace(m_step="optax", inner_steps=3),
        CFG.replace(distance="cosine", m_step="optax", lam=0.1, inner_steps=3),
    ],
)
def test_vmapped_batch_equals_a_python_loop_over_queries(rng, cfg):
    bank, queries = data(rng)
    out = refine_and_score(bank, queries, cfg)
    one = jax.jit(score_query)
    for i in range(queries.shape[0]):
        ref = one(bank, queries[i], cfg)
        # float32 distances ||f||^2 + ||r||^2 - 2<f, r> cancel: batched and
        # unbatched matmuls round differently at the 1e-5 level.
        # Squared norms here are ~600, so atol 1e-3 is ~2e-6 of them.
        np.testing.assert_allclose(out.image_scores[i], ref.image_scores, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(out.maps[i], ref.maps, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(out.patch_scores[i], ref.patch_scores, rtol=1e-4, atol=1e-3)
    assert out.maps.shape == (3, 32, 32)
    assert out.diagnostics.lsq_residual.shape == (3,)
    # A batch of one runs `score_query` unbatched (`score_batch`): same
    # numbers, same leading axis.
    single = refine_and_score(bank, queries[1:2], cfg)
    assert jax.tree.map(jnp.shape, single) == jax.tree.map(lambda x: (1, *x.shape[1:]), out)
    for got, ref in zip(jax.tree.leaves(single), jax.tree.leaves(out), strict=True):
        np.testing.assert_allclose(got[0], ref[1], rtol=1e-4, atol=1e-3)


class TraceCounter:
    """Counts how often jax traces a function (each compile traces it once)."""

    def __init__(self, fn):
        self.fn, self.count = fn, 0

    def __call__(self, *args, **kwargs):
        self.count += 1
        return self.fn(*args, **kwargs)


@pytest.fixture
def count_traces(monkeypatch):
    """`count_traces(module, name)`: a fresh trace counter on `module.name`, caches cleared."""

    def install(module, name):
        counter = TraceCounter(getattr(module, name))
        monkeypatch.setattr(module, name, counter)
        jax.clear_caches()  # a program compiled by an earlier test would hide a trace
        return counter

    return install


def test_new_float_hyperparameters_do_not_recompile(rng, count_traces):
    bank, queries = data(rng)
    cfg = CFG.replace(m_step="optax", inner_steps=2)
    traces = count_traces(pl, "score_query")
    refine_and_score(bank, queries, cfg)
    assert traces.count == 1
    for lam, eps, lr, ridge in [(0.1, 0.02, 0.5, 1e-3), (1.0, 0.2, 2.0, 1e-5)]:
        out = refine_and_score(bank, queries, cfg.replace(lam=lam, epsilon=eps, lr=lr, ridge=ridge))
    assert traces.count == 1
    # ... and the new values are really used.
    base = refine_and_score(bank, queries, cfg)
    assert not np.allclose(out.image_scores, base.image_scores)


def test_static_fields_do_recompile(rng, count_traces):
    bank, queries = data(rng)
    traces = count_traces(pl, "score_query")
    refine_and_score(bank, queries, CFG)
    refine_and_score(bank, queries, CFG.replace(num_iters=2))
    assert traces.count == 2


def test_online_scan_does_not_recompile_for_new_floats(rng, count_traces):
    bank, queries = data(rng, b=4)
    traces = count_traces(pl, "_score")
    online_refine_and_score(bank, queries, CFG, capacity=8, add_per_query=4)
    first = traces.count
    assert first >= 1
    new = CFG.replace(lam=1.0, epsilon=0.1, ridge=1e-3)
    online_refine_and_score(bank, queries, new, capacity=8, add_per_query=4)
    assert traces.count == first
    online_refine_and_score(bank, queries, CFG, capacity=16, add_per_query=4)  # static: new
    assert traces.count == 2 * first


def test_make_detect_compiles_once_per_shape(rng):
    w = jnp.asarray(rng.standard_normal((12, 48)), jnp.float32)
    extract = TraceCounter(lambda params, images: images.reshape(images.shape[0], -1, 12) @ params)
    detect = make_detect(extract)
    images = jnp.asarray(rng.standard_normal((2, 16, 16, 3)), jnp.float32)
    bank = jnp.asarray(rng.standard_normal((20, 48)), jnp.float32)
    detect(w, bank, images, CFG)
    detect(w, bank, images, CFG.replace(lam=1.0, epsilon=0.2))
    assert extract.count == 1
    detect(w, bank, images, CFG.replace(num_iters=2))
    assert extract.count == 2


def test_feature_dimension_mismatch_is_rejected(rng):
    bank, queries = data(rng)
    with pytest.raises(ValueError, match=r"feature dimension mismatch: bank has c=48 .* c=40"):
        refine_and_score(bank, queries[..., :40], CFG)


def test_empty_bank_is_rejected(rng):
    _, queries = data(rng)
    with pytest.raises(ValueError, match="bank is empty"):
        refine_and_score(jnp.zeros((0, 48)), queries, CFG)


def test_unbatched_queries_are_rejected_with_a_hint(rng):
    bank, queries = data(rng)
    with pytest.raises(ValueError, match=r"queries\[None\]"):
        refine_and_score(bank, queries[0], CFG)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["bank", "queries"])
def test_non_finite_features_are_rejected_before_jit(rng, bad, where):
    """Host (numpy) inputs are checked before they reach the device; device
    arrays are flagged in `inputs_ok` without a read-back, and `sync_check`
    raises the same error (issue 13 item 8)."""
    bank, queries = data(rng)
    if where == "bank":
        bank = bank.at[2, 5].set(bad)
    else:
        queries = queries.at[1, 3, 0].set(bad)
    with pytest.raises(ValueError, match=rf"{where} contains 1 NaN or infinite"):
        refine_and_score(np.asarray(bank), np.asarray(queries), CFG)
    out = refine_and_score(bank, queries, CFG)
    expect = np.ones(3, bool)
    expect[:] = where == "queries"
    if where == "queries":
        expect[1] = False
    np.testing.assert_array_equal(np.asarray(out.inputs_ok), expect)
    with pytest.raises(ValueError, match=rf"{where} contains 1 NaN or infinite"):
        refine_and_score(bank, queries, CFG, sync_check=True)


def test_device_inputs_cost_no_host_read_back(rng, monkeypatch):
    """Issue 13 item 8: no value check reads a device array back per call."""
    bank, queries = data(rng)
    refine_and_score(bank, queries, CFG)  # compile
    from protorefine_jax import checks

    def fail(*args, **kwargs):
        raise AssertionError("host read-back")

    monkeypatch.setattr(checks, "check_finite", fail)
    monkeypatch.setattr(checks, "check_range", fail)
    out = refine_and_score(bank, queries, CFG)
    assert out.inputs_ok.shape == (3,)


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e30, 1e37])
def test_cosine_scores_are_scale_invariant(rng, scale):
    """Issue 13 item 6: (1 - cos)/2 does not depend on the feature scale."""
    bank, queries = data(rng)
    cfg = CFG.replace(distance="cosine", m_step="optax", num_iters=2, inner_steps=2)
    ref = refine_and_score(bank, queries, cfg)
    out = refine_and_score(np.asarray(bank) * scale, np.asarray(queries) * scale, cfg)
    assert np.isfinite(np.asarray(out.patch_scores)).all()
    np.testing.assert_allclose(out.patch_scores, ref.patch_scores, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scale", [1e-12, 1e12])
def test_sqeuclidean_scores_scale_with_the_square(rng, scale):
    """Issue 13 item 6: inside the range, scores are exactly rescaled (power-of-two
    internal scaling); 1e19 / 1e30 / 1e-20 used to give NaN or exact zeros."""
    bank, queries = data(rng)
    ref = refine_and_score(bank, queries, CFG)
    out = refine_and_score(np.asarray(bank) * scale, np.asarray(queries) * scale, CFG)
    np.testing.assert_allclose(
        np.asarray(out.patch_scores) / scale**2, ref.patch_scores, rtol=2e-4, atol=1e-6
    )


@pytest.mark.parametrize(("bank_scale", "query_scale"), [(1e-7, 1.0), (1.0, 1e7), (1e7, 1e-3)])
def test_ridge_is_relative_to_the_bank_when_bank_and_queries_differ_in_scale(
    rng, bank_scale, query_scale
):
    """W-only scores against a float64 numpy reference, bank and queries of
    very different scales. The ridge is `ridge * trace(G) / n` of the bank
    itself; before the bank-unit Gram (issue 15) `trace(G)` was taken in the
    query's units and hit its 1e-12 floor (scores off by 30-70 %)."""
    bank, queries = map(np.asarray, data(rng))
    bank, queries = bank * bank_scale, queries * query_scale
    cfg = CFG.replace(use_transport=False, image_size=None)
    out = np.asarray(refine_and_score(bank, queries, cfg).patch_scores)
    m64 = bank.astype(np.float64)
    g = m64 @ m64.T
    delta = cfg.ridge * np.trace(g) / len(g)  # n = 20 < c = 48: the narrow ridge
    for i, f in enumerate(queries.astype(np.float64)):
        w0 = np.linalg.solve(g + delta * np.eye(len(g)), m64 @ f.T).T
        refined = w0 @ m64
        ref = ((f[:, None] - refined[None]) ** 2).sum(-1).min(1)
        # float32 cancellation in ||f||^2 + ||r||^2 - 2 <f, r>: ~1e-4 of ||f||^2.
        atol = 1e-4 * (f**2).sum(-1).max()
        np.testing.assert_allclose(out[i], ref, rtol=2e-3, atol=atol)


@pytest.mark.parametrize("scale", [1e-20, 1e19, 1e30])
def test_sqeuclidean_features_out_of_range_are_refused(rng, scale):
    bank, queries = data(rng)
    b, q = np.asarray(bank) * scale, np.asarray(queries) * scale
    with pytest.raises(ValueError, match=r"outside \[1e-15, 1e\+15\].*Multiply bank and queries"):
        refine_and_score(b, q, CFG)
    out = refine_and_score(jnp.asarray(b), jnp.asarray(q), CFG)
    assert not np.asarray(out.inputs_ok).any()
    with pytest.raises(ValueError, match="outside"):
        refine_and_score(jnp.asarray(b), jnp.asarray(q), CFG, sync_check=True)


def test_float16_features_are_accepted(rng):
    """float16 features used to raise an unrelated KeyError."""
    bank, queries = data(rng)
    out = refine_and_score(bank.astype(jnp.float16), queries.astype(jnp.float16), CFG)
    ref = refine_and_score(
        bank.astype(jnp.float16).astype(jnp.float32),
        queries.astype(jnp.float16).astype(jnp.float32),
        CFG,
    )
    np.testing.assert_allclose(out.patch_scores, ref.patch_scores, rtol=1e-6)


def test_bfloat16_norms_match_the_rounded_products(rng):
    """Issue 13 item 5: in bfloat16 mode the squared norms come from the same
    rounded features as the products: a patch that equals a prototype scores 0
    (before, |f|^2 from float32 features left a bias of about 2^-8 |f|^2)."""
    bank, queries = data(rng)
    queries = queries.at[0, :20].set(bank)
    cfg = CFG.replace(precision="bfloat16", use_refinement=False)
    out = refine_and_score(bank, queries, cfg)
    # float32 cancellation of |f|^2 + |m|^2 - 2<f, m> leaves a few ulp of
    # |f|^2; the old bias was about 2^-8 |f|^2, 400x this tolerance.
    f_sq = float(np.max(np.sum(np.asarray(bank) ** 2, axis=-1)))
    np.testing.assert_allclose(np.asarray(out.patch_scores)[0, :20], 0.0, atol=1e-5 * f_sq)


def test_tiny_run_is_deterministic(rng):
    """Issue 13 "Add": the same inputs give bit-identical outputs (fresh jit too)."""
    bank, queries = data(rng)
    first = refine_and_score(bank, queries, CFG)
    pl._refine_and_score_batch.clear_cache()
    second = refine_and_score(bank, queries, CFG)
    for x, y in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    online = [
        online_refine_and_score(bank, queries, CFG, capacity=8, add_per_query=4) for _ in range(2)
    ]
    for x, y in zip(*(jax.tree.leaves(o) for o in online), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_duplicate_prototypes_give_finite_scores(rng):
    bank, queries = data(rng)
    dup = jnp.concatenate([bank, bank, bank[:5]])
    out = refine_and_score(dup, queries, CFG)
    assert np.isfinite(np.asarray(out.maps)).all()


def test_config_rejects_closed_form_for_cosine():
    with pytest.raises(ValueError, match="closed_form"):
        RefineConfig(distance="cosine", m_step="closed_form")


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"distance": "l1"}, "distance must be one of"),
        ({"bank": "all"}, "bank must be one of"),
        ({"num_iters": 0}, "num_iters must be a positive int"),
        ({"lam": -1.0}, "lam must be a finite number in \\[0, "),
        ({"ridge": 0.0}, "ridge must be a finite number in \\[1e-06, "),
        ({"epsilon": 0.0}, "epsilon must be a finite number in \\[0.001, "),
    ],
)
def test_config_rejects_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        RefineConfig(**kw)


def test_refinement_separates_an_anomalous_patch(rng):
    """A planted off-subspace patch gets the top score once the bank is refined.

    The bank spans the normal subspace, so the refined prototypes reconstruct
    normal patches almost exactly, and only the planted patch is left far
    from them (plain nearest-prototype scoring need not find it).
    """
    c = 64
    basis = subspace(rng, 8, c)
    support = lowrank_features(rng, (2, 64, c), basis, noise=0.01)
    bank = build_bank(jnp.asarray(support), 0.1)
    query = lowrank_features(rng, (1, 64, c), basis, noise=0.01)
    query[0, 27] += 3.0 * rng.standard_normal(c).astype(np.float32)
    for cfg in [CFG, CFG.replace(use_transport=False)]:
        out = refine_and_score(bank.prototypes, jnp.asarray(query), cfg)
        assert int(np.argmax(out.patch_scores[0])) == 27


def test_make_detect_equals_extract_then_refine(rng):
    weights = jnp.asarray(rng.standard_normal((4 * 4 * 3, 16)), jnp.float32)

    def extract(params, images):  # 4x4 patchify + linear map
        b = images.shape[0]
        patches = images.reshape(b, 8, 4, 8, 4, 3).transpose(0, 1, 3, 2, 4, 5)
        return patches.reshape(b, 64, 48) @ params

    images = jnp.asarray(rng.random((2, 32, 32, 3)), jnp.float32)
    bank = build_bank(extract(weights, images[:1]), 0.25).prototypes
    detect = make_detect(extract)
    got = detect(weights, bank, images, CFG)
    ref = refine_and_score(bank, extract(weights, images), CFG)
    np.testing.assert_allclose(got.image_scores, ref.image_scores, rtol=1e-5)
    np.testing.assert_allclose(got.maps, ref.maps, rtol=1e-5, atol=1e-6)


def test_online_scan_equals_a_python_loop_with_a_ring_buffer(rng):
    bank, queries = data(rng, b=4)
    cap, add = 12, 5
    out = online_refine_and_score(bank, queries, CFG, capacity=cap, add_per_query=add)
    buffer, valid, cursor = np.zeros((cap, 48), np.float32), np.zeros(cap, bool), 0
    for t in range(4):
        full = jnp.concatenate([bank, jnp.asarray(buffer * valid[:, None])])
        weights = np.concatenate([np.ones(len(bank), bool), valid])
        # The ridge is the support bank's (`span_rows`: the buffer lies in its span).
        ref, w = jax.jit(pl._score, static_argnames="span_rows")(
            full, queries[t], CFG, jnp.asarray(weights / weights.sum()), span_rows=len(bank)
        )
        # Buffer contents feed the next query: float32 differences compound.
        np.testing.assert_allclose(out.image_scores[t], ref.image_scores, rtol=1e-3)
        np.testing.assert_allclose(out.maps[t], ref.maps, rtol=1e-3, atol=1e-4)
        refined = np.asarray(w @ full)  # c = 48 <= 128: no projection
        new = refined[np.asarray(pl.greedy_coreset_indices(jnp.asarray(refined), add, 0))]
        for k in range(add):
            buffer[(cursor + k) % cap], valid[(cursor + k) % cap] = new[k], True
        cursor = (cursor + add) % cap


def _numpy_online_cosine_w_only(bank, queries, capacity, ridge):
    """Float64 online W-only cosine, written independently of the library: the
    ring buffer receives every refined prototype `R = W0 normalize(M)`.
    `add_per_query = m` and `capacity` a multiple of m, so the coreset keeps
    every row and whole blocks are overwritten (the order within a block does
    not change any score)."""

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    buffer, scores = [], []
    for q in queries.astype(np.float64):
        full = np.concatenate([bank.astype(np.float64)] + buffer) if buffer else bank
        mh, fh = unit(np.asarray(full, np.float64)), unit(q)
        gram = mh @ mh.T
        delta = ridge * np.trace(gram) / len(mh)
        w = np.linalg.solve(gram + delta * np.eye(len(mh)), mh @ fh.T).T
        refined = w @ mh
        cos = fh @ unit(refined).T
        scores.append(0.5 * (1.0 - cos.max(axis=1)))
        buffer.append(refined)
        buffer = buffer[-(capacity // len(q)) :]
    return np.stack(scores)


def test_online_cosine_pushes_the_prototypes_w_was_solved_for(rng):
    """Issue 13 item 2: the pushed rows are `W @ normalize(full)`; before, the
    unnormalised buffer rows were pushed (median cosine 0.93 to the intended)."""
    bank, queries = data(rng, b=5, m=16)
    bank, queries = bank * 7.0, queries * 3.0  # non-unit rows expose the bug
    cap = 32
    cfg = CFG.replace(
        distance="cosine",
        m_step="optax",
        use_transport=False,
        image_size=None,
        grid_shape=(4, 4),
        ridge_wide=1e-2,
    )
    out = online_refine_and_score(bank, queries, cfg, capacity=cap, add_per_query=16)
    ref = _numpy_online_cosine_w_only(np.asarray(bank), np.asarray(queries), cap, 1e-2)
    np.testing.assert_allclose(np.asarray(out.patch_scores), ref, rtol=2e-3, atol=2e-6)


@pytest.mark.parametrize("cfg", [CFG, CFG.replace(bank="union")])
def test_first_online_query_sees_exactly_the_offline_bank(rng, cfg):
    bank, queries = data(rng, b=2)
    out = online_refine_and_score(bank, queries, cfg, capacity=16, add_per_query=4)
    ref = refine_and_score(bank, queries[:1], cfg)
    # Same numbers up to float32 summation order (squared norms here are ~600).
    np.testing.assert_allclose(out.image_scores[0], ref.image_scores[0], rtol=1e-4)
    np.testing.assert_allclose(out.maps[0], ref.maps[0], rtol=1e-4, atol=1e-3)


def test_online_rejects_bad_sizes(rng):
    bank, queries = data(rng)
    with pytest.raises(ValueError, match="add_per_query"):
        online_refine_and_score(bank, queries, CFG, capacity=4, add_per_query=8)


def test_lists_and_memory_banks_are_accepted(rng):
    bank, queries = data(rng)
    cfg = CFG.replace(grid_shape=[8, 8], image_size=[32, 32])
    assert cfg.grid_shape == (8, 8)
    mem = build_bank(queries[:1], 0.3)
    out = refine_and_score(mem, queries, cfg)
    ref = refine_and_score(mem.prototypes, queries, CFG)
    np.testing.assert_allclose(out.maps, ref.maps, rtol=1e-6)


@pytest.mark.parametrize("span_rows", [0, 21])
def test_gram_system_rejects_span_rows_outside_the_bank(rng, span_rows):
    bank, queries = data(rng, b=1)  # n = 20
    with pytest.raises(
        ValueError, match=r"span_rows must lie in \[1, n=20\], got " + str(span_rows)
    ):
        pl.gram_system(bank, queries[0], CFG, span_rows=span_rows)
