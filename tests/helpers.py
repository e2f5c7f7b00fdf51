"""Helpers shared by the tests (import as `from helpers import ...`)."""

from __future__ import annotations

import numpy as np


def subspace(rng, rank, c):
    """A random `[rank, c]` basis: deep features live near such subspaces."""
    return rng.standard_normal((rank, c))


def lowrank_features(rng, shape, basis, noise=0.05):
    """`shape[:-1]` points in span(`basis`) plus isotropic noise, float32."""
    coeff = rng.standard_normal((*shape[:-1], basis.shape[0]))
    return (coeff @ basis + noise * rng.standard_normal(shape)).astype(np.float32)


def lowrank_bank_and_queries(rng, b, m, c, n, rank):
    """A `[n, c]` bank and `[b, m, c]` queries near one random rank-`rank` subspace."""
    basis = subspace(rng, rank, c)
    bank = lowrank_features(rng, (n, c), basis)
    return bank, lowrank_features(rng, (b, m, c), basis)


class TraceCounter:
    """Wraps a function and counts how often jax traces it."""

    def __init__(self, fn):
        self.fn = fn
        self.count = 0

    def __call__(self, *args, **kwargs):
        self.count += 1
        return self.fn(*args, **kwargs)


# fit / predict on synthetic images with a random tiny backbone.
FAST_FIT = dict(image_size=64, weights="random", batch_size=4, progress=False)
FAST_REFINE = (("num_iters", 2), ("sinkhorn_iters", 10))


def demo_category(tmp_path_factory):
    """The synthetic `fabric` category: 3 good train images, 3 good and 3 defective test ones."""
    from protorefine_jax.data import make_synthetic_dataset

    root = make_synthetic_dataset(
        tmp_path_factory.mktemp("demo"), ["fabric"], 3, 3, 3, image_size=64, seed=0
    )
    return root / "fabric"
