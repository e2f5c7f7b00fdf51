"""Error types of the file readers in :mod:`protorefine_jax.io`."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A weight file is missing, unsafe, corrupt, or does not match a model.

    The message names the file and the problem.
    """
