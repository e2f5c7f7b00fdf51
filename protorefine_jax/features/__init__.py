"""Patch feature extractors (PatchCore+ backbones): public API by re-export."""

from protorefine_jax.features.aggregation import (
    adaptive_avg_pool_1d,
    bilinear_resize,
    official_aggregate,
    simple_aggregate,
    unfold_3x3,
)
from protorefine_jax.features.checkpoints import CheckpointError
from protorefine_jax.features.efficientnet_lite import EfficientNetLite
from protorefine_jax.features.extractor import (
    AGGREGATIONS,
    BACKBONES,
    SPECS,
    Extractor,
    check_images,
    get_extractor,
)
from protorefine_jax.features.preprocess import preprocess_batch, resize_image, to_rgb
from protorefine_jax.features.resnet import ResNet, WideResNet50_2

__all__ = [
    "AGGREGATIONS",
    "BACKBONES",
    "SPECS",
    "CheckpointError",
    "EfficientNetLite",
    "Extractor",
    "ResNet",
    "WideResNet50_2",
    "adaptive_avg_pool_1d",
    "bilinear_resize",
    "check_images",
    "get_extractor",
    "official_aggregate",
    "preprocess_batch",
    "resize_image",
    "simple_aggregate",
    "to_rgb",
    "unfold_3x3",
]
