"""CLIP architecture descriptions and their Hugging Face configs.

`ClipSpec` holds the numbers that fix a CLIP model's shapes, plus the image
normalisation its weights were trained with. It is a frozen, hashable
dataclass so it can sit in the static part of a jitted config; the Hugging
Face `CLIPConfig` (not hashable) is derived from it on demand. The
normalisation is not part of `CLIPConfig` (Hugging Face keeps it in the
folder's `preprocessor_config.json`, read by `io.clip_folder.load_clip`), so
`to_hf_config` / `from_hf_config` round-trip the shapes only and
`from_hf_config` returns the OpenAI mean/std.

Presets:
  * `VIT_B_16_PLUS_240`: OpenCLIP ViT-B-16-plus-240 (WinCLIP's and the FastRef
    paper's model, Sec. 5.2): vision width 896, 12 layers, 14 heads, patch 16,
    240 px (15x15 tokens); text width 640, 12 layers, 10 heads; embed 640;
    exact GELU.
  * `VIT_B_16`: OpenAI ViT-B/16 as on the Hugging Face hub
    (`openai/clip-vit-base-patch16`): width 768, 224 px (14x14 tokens), text
    width 512, embed 512, quick GELU.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from transformers import CLIPConfig
from transformers.models.clip.modeling_flax_clip import FlaxCLIPModule

_ACTIVATIONS = ("gelu", "quick_gelu")

# Allowed range of every integer field (a config file is untrusted: sizes set shapes).
_INT_RANGES = {
    "image_size": (1, 8192),
    "patch_size": (1, 8192),
    "vision_width": (1, 16384),
    "vision_layers": (1, 256),
    "vision_heads": (1, 1024),
    "vision_mlp": (1, 65536),
    "text_width": (1, 16384),
    "text_layers": (1, 256),
    "text_heads": (1, 1024),
    "text_mlp": (1, 65536),
    "context_length": (1, 4096),
    "vocab_size": (2, 1_000_000),
    "embed_dim": (1, 16384),
}
# config.json (Hugging Face CLIPConfig) field of each spec field.
_HF_FIELDS = {
    ("vision_config", "image_size"): "image_size",
    ("vision_config", "patch_size"): "patch_size",
    ("vision_config", "hidden_size"): "vision_width",
    ("vision_config", "num_hidden_layers"): "vision_layers",
    ("vision_config", "num_attention_heads"): "vision_heads",
    ("vision_config", "intermediate_size"): "vision_mlp",
    ("text_config", "hidden_size"): "text_width",
    ("text_config", "num_hidden_layers"): "text_layers",
    ("text_config", "num_attention_heads"): "text_heads",
    ("text_config", "intermediate_size"): "text_mlp",
    ("text_config", "max_position_embeddings"): "context_length",
    ("text_config", "vocab_size"): "vocab_size",
    (None, "projection_dim"): "embed_dim",
}


def _check_int(value: Any, name: str, field: str) -> None:
    lo, hi = _INT_RANGES[field]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r:.60}")


def _check_eps(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r:.60}")


def _check_act(value: Any, name: str) -> None:
    if not isinstance(value, str) or value not in _ACTIVATIONS:
        raise ValueError(f"{name} must be one of {_ACTIVATIONS}, got {value!r:.60}")


# OpenAI CLIP image normalisation (OpenCLIP ViT-B-16-plus-240 uses the same).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """Shape-setting hyper-parameters of a CLIP model (vision + text towers).

    Attributes:
      image_size: input side in pixels (square).
      patch_size: ViT patch side in pixels.
      vision_width: vision transformer width `D`.
      vision_layers: vision transformer depth.
      vision_heads: vision attention heads.
      vision_mlp: vision MLP hidden width.
      text_width: text transformer width.
      text_layers: text transformer depth.
      text_heads: text attention heads.
      text_mlp: text MLP hidden width.
      context_length: text positions (77 for CLIP).
      vocab_size: BPE vocabulary size (49408 for CLIP).
      embed_dim: joint embedding width `E` (output of both projections).
      hidden_act: `"gelu"` (exact erf GELU, OpenCLIP) or `"quick_gelu"`
        (OpenAI CLIP).
      layer_norm_eps: LayerNorm epsilon (1e-5 in both OpenCLIP and HF).
      image_mean: per-channel RGB mean of the input normalisation, on the
        [0, 1] scale (`preprocessor_config.json`'s `image_mean`; default
        OpenAI CLIP's `CLIP_MEAN`, which OpenCLIP ViT-B-16-plus-240 shares).
      image_std: per-channel RGB std, same scale (default `CLIP_STD`).
    """

    image_size: int = 240
    patch_size: int = 16
    vision_width: int = 896
    vision_layers: int = 12
    vision_heads: int = 14
    vision_mlp: int = 3584
    text_width: int = 640
    text_layers: int = 12
    text_heads: int = 10
    text_mlp: int = 2560
    context_length: int = 77
    vocab_size: int = 49408
    embed_dim: int = 640
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self):
        for field in _INT_RANGES:
            _check_int(getattr(self, field), field, field)
        _check_eps(self.layer_norm_eps, "layer_norm_eps")
        _check_act(self.hidden_act, "hidden_act")
        for name in ("image_mean", "image_std"):
            value = tuple(float(v) for v in getattr(self, name))  # hashable, lists ok
            if len(value) != 3:
                raise ValueError(f"{name} needs 3 (RGB) values, got {value}.")
            object.__setattr__(self, name, value)
        if min(self.image_std) <= 0:
            raise ValueError(f"image_std must be positive, got {self.image_std}.")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {_ACTIVATIONS}, got {self.hidden_act!r}.")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}."
            )
        for width, heads, name in (
            (self.vision_width, self.vision_heads, "vision"),
            (self.text_width, self.text_heads, "text"),
        ):
            if heads < 1 or width % heads:
                raise ValueError(f"{name} width {width} is not divisible by {heads} heads.")

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid `(h, w)` of the vision tower."""
        side = self.image_size // self.patch_size
        return (side, side)

    @property
    def eos_token_id(self) -> int:
        """Id of `<|endoftext|>`: the last vocabulary entry, as in CLIP's BPE."""
        return self.vocab_size - 1

    @property
    def bos_token_id(self) -> int:
        """Id of `<|startoftext|>`: the second-to-last vocabulary entry."""
        return self.vocab_size - 2

    def to_hf_config(self) -> CLIPConfig:
        """Builds the equivalent Hugging Face `CLIPConfig` (shapes; not `image_mean/std`)."""
        text = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.text_width,
            intermediate_size=self.text_mlp,
            num_hidden_layers=self.text_layers,
            num_attention_heads=self.text_heads,
            max_position_embeddings=self.context_length,
            hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps,
            projection_dim=self.embed_dim,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.eos_token_id,
        )
        vision = dict(
            hidden_size=self.vision_width,
            intermediate_size=self.vision_mlp,
            num_hidden_layers=self.vision_layers,
            num_attention_heads=self.vision_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=3,
            hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps,
            projection_dim=self.embed_dim,
        )
        return CLIPConfig(text_config=text, vision_config=vision, projection_dim=self.embed_dim)

    @classmethod
    def from_hf_config(cls, config: CLIPConfig | dict[str, Any]) -> ClipSpec:
        """Reads a spec from a Hugging Face `CLIPConfig` or its `config.json` dict.

        `CLIPConfig` carries no image normalisation: the spec gets the default
        (OpenAI) mean/std; `io.clip_folder.load_clip` replaces them with the folder's
        `preprocessor_config.json` values.

        Args:
          config: a `CLIPConfig`, or the parsed `config.json` of an HF CLIP folder.

        Returns:
          The matching `ClipSpec`.

        Raises:
          ValueError: a field of the wrong type or out of range (the message
            names the `config.json` field and what is allowed), or text and
            vision activations that differ (HF allows it, this project's
            towers do not need it).
        """
        if isinstance(config, dict):
            _check_hf_dict(config)
            config = CLIPConfig.from_dict(config)
        text, vision = config.text_config, config.vision_config
        if text.hidden_act != vision.hidden_act:
            raise ValueError(
                f"text and vision activations differ ({text.hidden_act!r} vs "
                f"{vision.hidden_act!r}); not supported."
            )
        return cls(
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            vision_width=vision.hidden_size,
            vision_layers=vision.num_hidden_layers,
            vision_heads=vision.num_attention_heads,
            vision_mlp=vision.intermediate_size,
            text_width=text.hidden_size,
            text_layers=text.num_hidden_layers,
            text_heads=text.num_attention_heads,
            text_mlp=text.intermediate_size,
            context_length=text.max_position_embeddings,
            vocab_size=text.vocab_size,
            embed_dim=config.projection_dim,
            hidden_act=vision.hidden_act,
            layer_norm_eps=vision.layer_norm_eps,
        )


def _check_hf_dict(config: dict[str, Any]) -> None:
    """Type and range of every `config.json` field `from_hf_config` reads (before HF sees it)."""
    for sub in ("text_config", "vision_config"):
        if config.get(sub) is not None and not isinstance(config[sub], dict):
            raise ValueError(f"{sub} must be a JSON object, got {type(config[sub]).__name__}")
    for (sub, key), field in _HF_FIELDS.items():
        part = config if sub is None else config.get(sub) or {}
        if key in part:
            _check_int(part[key], key if sub is None else f"{sub}.{key}", field)
    for sub in ("text_config", "vision_config"):
        part = config.get(sub) or {}
        if "layer_norm_eps" in part:
            _check_eps(part["layer_norm_eps"], f"{sub}.layer_norm_eps")
        if "hidden_act" in part:
            _check_act(part["hidden_act"], f"{sub}.hidden_act")


VIT_B_16_PLUS_240 = ClipSpec()

VIT_B_16 = ClipSpec(
    image_size=224,
    vision_width=768,
    vision_heads=12,
    vision_mlp=3072,
    text_width=512,
    text_heads=8,
    text_mlp=2048,
    embed_dim=512,
    hidden_act="quick_gelu",
)

PRESETS: dict[str, ClipSpec] = {
    "ViT-B-16-plus-240": VIT_B_16_PLUS_240,
    "ViT-B-16": dataclasses.replace(VIT_B_16, hidden_act="gelu"),
    "ViT-B-16-quickgelu": VIT_B_16,
}
"""OpenCLIP model names -> specs (OpenCLIP's own ViT-B-16 uses exact GELU;
OpenAI's weights need quick GELU, OpenCLIP name `ViT-B-16-quickgelu`)."""


@functools.lru_cache(maxsize=16)
def clip_module(spec: ClipSpec) -> FlaxCLIPModule:
    """The (parameter-free) Hugging Face Flax CLIP module for `spec`.

    The module holds no weights: call it with `module.apply({"params": p}, ...)`.
    """
    return FlaxCLIPModule(config=spec.to_hf_config())


def random_params(spec: ClipSpec, seed: int = 0, std: float = 0.02) -> dict[str, Any]:
    """Random float32 params in the HF Flax CLIP tree, for tests and benchmarks.

    The tree's shapes come from `module.init` under `jax.eval_shape` (nothing
    is initialised for real, so this is fast even for full-size models); every
    leaf is drawn i.i.d. `N(0, std^2)` with numpy.

    Args:
      spec: CLIP architecture.
      seed: numpy seed.
      std: standard deviation of every entry.

    Returns:
      Params usable wherever loaded ones are (`{"params": tree}` for the module).
    """
    ids = jnp.zeros((1, spec.context_length), jnp.int32)
    pixels = jnp.zeros((1, spec.image_size, spec.image_size, 3), jnp.float32)
    module = clip_module(spec)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids, pixels, ids, ids))
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(std * rng.standard_normal(s.shape, np.float32)), shapes["params"]
    )
