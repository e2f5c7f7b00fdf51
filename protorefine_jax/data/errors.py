"""Exceptions raised by the dataset readers.

Every message names what is wrong AND how to fix it, because these errors are
what a user sees first when a dataset folder is laid out differently from what
the readers expect. All of them derive from :class:`DatasetError`, so callers
can catch one type; each also derives from the closest builtin
(`FileNotFoundError` / `ValueError` / `PermissionError`) so generic handlers keep working.
"""

from __future__ import annotations


class DatasetError(Exception):
    """Base class of every dataset-reading error in `protorefine_jax.data`."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The dataset root, a category or a split folder does not exist."""


class UnknownCategoryError(DatasetError, ValueError):
    """A category name is not among the known categories of a named dataset."""


class CorruptImageError(DatasetError, ValueError):
    """An image or mask file exists but cannot be decoded."""


class UnreadableFileError(DatasetError, PermissionError):
    """An image, mask or folder exists but this user may not read it (permissions)."""


class EmptyMaskError(DatasetError, ValueError):
    """A defective test image's mask has no defect pixel (with `require_masks`)."""


class OneClassTestSetError(DatasetError, ValueError):
    """A test set holds only good or only defective images: AUROC / F1-max are undefined."""


class ImageTooLargeError(CorruptImageError):
    """An image or mask has more pixels than the decode limit (decompression bomb)."""


class UnsafeNameError(DatasetError, ValueError):
    """A category name or a path listed in a dataset file would leave its folder."""


class MissingMaskError(DatasetError, FileNotFoundError):
    """A defective test image has no ground-truth mask file."""


class EmptyTrainSetError(DatasetError, ValueError):
    """`train/good` holds no image, so no support set can be drawn."""


class NotEnoughShotsError(DatasetError, ValueError):
    """More support shots were requested than there are good training images."""
