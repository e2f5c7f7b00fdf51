"""WinCLIP / WinCLIP+ on Hugging Face Flax CLIP: public API by re-export.

Example:
  >>> bundle = load_clip("checkpoints/clip/ViT-B-16-plus-240")  # local HF folder
  >>> config = winclip_config(use_refinement=True, clip=bundle.spec)  # WinCLIP+
  >>> support = extract_multiscale(bundle.params, support_images, config)
  >>> banks = build_banks(support, CORESET_ALPHA["mvtec"])  # coresets + full memory
  >>> text = class_text_features(bundle.spec, bundle.params, bundle.tokenizer, "bottle")
  >>> cal = calibrate(support, config, alpha=CORESET_ALPHA["mvtec"])  # optional calibration
  >>> out = detect(bundle.params, banks, text, query_images, config, cal)
  >>> out.image_scores.shape, out.maps.shape
  ((B,), (B, 240, 240))
"""

from protorefine_jax.clip.convert import (
    flax_to_hf_state_dict,
    hf_state_dict_to_flax,
    infer_openclip_spec,
    openclip_to_hf_state_dict,
)
from protorefine_jax.clip.prompts import (
    class_text_features,
    object_name,
    prompt_ensemble,
    tokenize,
)
from protorefine_jax.clip.spec import (
    PRESETS,
    VIT_B_16,
    VIT_B_16_PLUS_240,
    ClipSpec,
    clip_module,
    random_params,
)
from protorefine_jax.clip.towers import (
    MultiscaleFeatures,
    encode_image,
    encode_multiscale,
    encode_text,
    encode_windows,
    preprocess,
)
from protorefine_jax.clip.winclip import (
    CORESET_ALPHA,
    WinClipBanks,
    WinClipConfig,
    WinClipOutput,
    anomaly_probability,
    build_banks,
    calibrate,
    detect,
    extract_multiscale,
    score,
    winclip_config,
)
from protorefine_jax.clip.windows import aggregate_windows, coverage_counts, window_indices

# File reading lives in protorefine_jax.io.clip_folder, which imports this
# package's pure modules; its names are re-exported lazily to avoid the cycle.
_CLIP_FOLDER_NAMES = (
    "ClipBundle",
    "check_clip_folder",
    "convert_openclip",
    "load_clip",
    "load_tokenizer",
    "missing_clip_files",
    "read_state_dict",
    "write_clip_folder",
)


def __getattr__(name: str):
    if name in _CLIP_FOLDER_NAMES:
        from protorefine_jax.io import clip_folder

        return getattr(clip_folder, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CORESET_ALPHA",
    "PRESETS",
    "VIT_B_16",
    "VIT_B_16_PLUS_240",
    "ClipBundle",
    "ClipSpec",
    "MultiscaleFeatures",
    "WinClipBanks",
    "WinClipConfig",
    "WinClipOutput",
    "aggregate_windows",
    "anomaly_probability",
    "build_banks",
    "calibrate",
    "check_clip_folder",
    "clip_module",
    "class_text_features",
    "convert_openclip",
    "coverage_counts",
    "detect",
    "encode_image",
    "encode_multiscale",
    "encode_text",
    "encode_windows",
    "extract_multiscale",
    "flax_to_hf_state_dict",
    "hf_state_dict_to_flax",
    "infer_openclip_spec",
    "load_clip",
    "load_tokenizer",
    "missing_clip_files",
    "object_name",
    "openclip_to_hf_state_dict",
    "preprocess",
    "prompt_ensemble",
    "random_params",
    "read_state_dict",
    "score",
    "tokenize",
    "window_indices",
    "winclip_config",
    "write_clip_folder",
]
