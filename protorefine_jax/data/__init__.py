"""Dataset I/O: folder / VisA readers, synthetic data, few-shot protocol.

The TFDS builders live in :mod:`protorefine_jax.data.tfds_builders` and are
not re-exported, so importing this package does not import
`tensorflow_datasets`.
"""

from protorefine_jax.data.errors import (
    CorruptImageError,
    DatasetError,
    DatasetNotFoundError,
    EmptyTrainSetError,
    MissingMaskError,
    NotEnoughShotsError,
    UnknownCategoryError,
)
from protorefine_jax.data.fewshot import (
    DEFAULT_SEEDS,
    SupportSet,
    aggregate_seeds,
    mean_std,
    sample_support,
    support_sets,
)
from protorefine_jax.data.folder import (
    CategoryData,
    TestBatch,
    TestItem,
    discover_categories,
    load_category,
)
from protorefine_jax.data.imageio import (
    IMAGE_EXTENSIONS,
    MVTEC_MASK_THRESHOLD,
    VISA_MASK_THRESHOLD,
    read_image,
    read_images,
    read_mask,
)
from protorefine_jax.data.registry import (
    DATASETS,
    KNOWN_CATEGORIES,
    MPDD_CATEGORIES,
    MVTEC_CATEGORIES,
    VISA_CATEGORIES,
    check_category,
    list_categories,
    load_dataset_category,
)
from protorefine_jax.data.synthetic import (
    DEFECT_TYPES,
    SYNTHETIC_CATEGORIES,
    SyntheticSample,
    make_synthetic_dataset,
    render,
)
from protorefine_jax.data.visa import load_visa_category, read_visa_csv, visa_categories

__all__ = [
    "DATASETS",
    "DEFAULT_SEEDS",
    "DEFECT_TYPES",
    "IMAGE_EXTENSIONS",
    "KNOWN_CATEGORIES",
    "MPDD_CATEGORIES",
    "MVTEC_CATEGORIES",
    "MVTEC_MASK_THRESHOLD",
    "SYNTHETIC_CATEGORIES",
    "VISA_CATEGORIES",
    "VISA_MASK_THRESHOLD",
    "CategoryData",
    "CorruptImageError",
    "DatasetError",
    "DatasetNotFoundError",
    "EmptyTrainSetError",
    "MissingMaskError",
    "NotEnoughShotsError",
    "SupportSet",
    "SyntheticSample",
    "TestBatch",
    "TestItem",
    "UnknownCategoryError",
    "aggregate_seeds",
    "check_category",
    "discover_categories",
    "list_categories",
    "load_category",
    "load_dataset_category",
    "load_visa_category",
    "make_synthetic_dataset",
    "mean_std",
    "read_image",
    "read_images",
    "read_mask",
    "read_visa_csv",
    "render",
    "sample_support",
    "support_sets",
    "visa_categories",
]
