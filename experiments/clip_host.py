"""WinCLIP / WinCLIP+ host of the eval CLI (CLIP features, text prompts).

Kept apart from `hosts.py` so that a PatchCore-only run never imports the
CLIP stack (transformers).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from experiments.hosts import ScoreResult, batched
from experiments.methods import Method
from protorefine_jax import RefineConfig
from protorefine_jax.clip import (
    WinClipConfig,
    build_banks,
    class_text_features,
    extract_multiscale,
    load_clip,
    score,
    winclip_config,
)


class WinClipHost:
    """WinCLIP / WinCLIP+ from a local Hugging Face CLIP folder."""

    family = "winclip"
    # anomalib's WinCLIP: Resize((240, 240), bicubic, antialias=True) of the decoded image.
    resample = "bicubic"

    def __init__(self, clip_dir: str, image_size: int, batch_size: int, dataset: str):
        bundle = load_clip(clip_dir)  # names the missing files if the folder is incomplete
        self.spec, self.params, self.tokenizer = bundle
        if image_size != self.spec.image_size:
            raise ValueError(
                f"--image_size={image_size} but the CLIP model in {clip_dir} takes "
                f"{self.spec.image_size} px; pass --image_size={self.spec.image_size}."
            )
        self.image_size = image_size
        self.batch_size = batch_size
        self.clip_dir = clip_dir
        self.extract_config = winclip_config(clip=self.spec)
        self.text = None

    def describe(self) -> dict[str, Any]:
        """What the results should record about the features."""
        return {
            "clip_dir": self.clip_dir,
            "clip": self.spec.to_hf_config().to_dict()["vision_config"]["hidden_size"],
            "grid": list(self.spec.grid_size),
            "image_size": self.image_size,
        }

    def prepare(self, category: str) -> None:
        """Encodes the category's prompt ensembles; the raw category (`metal_nut`), as anomalib."""
        self.text = class_text_features(self.spec, self.params, self.tokenizer, category)

    def features(self, images: np.ndarray):
        """`[N, S, S, 3]` uint8 -> `MultiscaleFeatures` with leading axis N."""
        return batched(
            lambda x: extract_multiscale(self.params, jnp.asarray(x), self.extract_config),
            images,
            self.batch_size,
        )

    def build_bank(self, support_features, alpha: float):
        """Per scale (full-image patches, 2x2, 3x3 windows): coreset bank and full memory."""
        return build_banks(support_features, alpha)

    def base_config(self, **fields) -> RefineConfig:
        """Few-shot `RefineConfig`: cosine distance, raw grids (maps built by WinCLIP)."""
        return RefineConfig(distance="cosine", image_size=None, **fields)

    def score(self, banks, test_features, method: Method, config: RefineConfig, online):
        """Scores every test image (Eq. 9 fusion of zero- and few-shot branches)."""
        del online
        if method.online:
            raise ValueError("the online variant is implemented for PatchCore+ only.")
        wc = WinClipConfig(
            refine=config,
            clip=self.spec,
            image_size=(self.image_size, self.image_size),
            **method.host_options,
        )
        out = batched(lambda f: score(f, banks, self.text, wc), test_features, self.batch_size)
        diags = {k: np.asarray(v) for k, v in out.diagnostics._asdict().items()}
        return ScoreResult(np.asarray(out.image_scores), np.asarray(out.maps), diags)
