"""State-dict conversions: OpenCLIP -> HF (PyTorch layout) -> HF Flax params.

Pure numpy, no torch, no file access (file reading lives in `protorefine_jax.io.clip_folder`).

Layouts:
  * OpenCLIP: `visual.conv1.weight` `[D, 3, p, p]`, fused attention
    `attn.in_proj_weight` `[3D, D]` (rows q, k, v), `visual.proj` `[D, E]`
    (used as `x @ proj`), `text_projection` `[W, E]`.
  * HF PyTorch layout (what `model.safetensors` of an HF CLIP folder holds):
    `nn.Linear` weights `[out, in]`, conv `[O, I, kh, kw]`, LayerNorm
    `weight`/`bias`, embeddings `weight`.
  * HF Flax params: `Dense` kernels `[in, out]`, conv kernels `[kh, kw, I, O]`
    (HWIO), LayerNorm `scale`/`bias`, `Embed` `embedding`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from protorefine_jax.clip.spec import ClipSpec

Params = dict[str, Any]

# HF PyTorch buffers that carry no weights.
_HF_IGNORED = re.compile(r".*position_ids$")
# OpenCLIP buffers / heads with no HF counterpart.
_OPENCLIP_IGNORED = re.compile(r"^(attn_mask|logit_bias)$")

_BLOCK_MAP = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def _block_keys(sd: Mapping[str, np.ndarray], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    if indices != set(range(len(indices))):
        raise ValueError(f"non-contiguous block indices under {prefix!r}: {sorted(indices)}")
    return len(indices)


def _convert_tower(
    sd: Mapping[str, np.ndarray], src: str, dst: str, layers: int, out: dict[str, np.ndarray]
) -> set[str]:
    """Maps OpenCLIP resblocks `src{i}.*` to HF encoder layers `dst{i}.*`."""
    used = set()
    for i in range(layers):
        s, d = f"{src}{i}.", f"{dst}{i}."
        for old, new in _BLOCK_MAP.items():
            for kind in ("weight", "bias"):
                out[f"{d}{new}.{kind}"] = sd[f"{s}{old}.{kind}"]
                used.add(f"{s}{old}.{kind}")
        w, b = sd[f"{s}attn.in_proj_weight"], sd[f"{s}attn.in_proj_bias"]
        for name, w_part, b_part in zip(
            ("q_proj", "k_proj", "v_proj"), np.split(w, 3, axis=0), np.split(b, 3), strict=True
        ):
            out[f"{d}self_attn.{name}.weight"] = w_part
            out[f"{d}self_attn.{name}.bias"] = b_part
        used |= {f"{s}attn.in_proj_weight", f"{s}attn.in_proj_bias"}
    return used


def infer_openclip_spec(
    sd: Mapping[str, np.ndarray],
    hidden_act: str = "gelu",
    head_width: int = 64,
) -> ClipSpec:
    """Reads a `ClipSpec` off the shapes of an OpenCLIP state dict.

    Head counts are not visible in the weights; OpenCLIP's default head width
    (64) gives them, as for every standard OpenCLIP ViT (ViT-B-16-plus-240:
    896/64 = 14 vision heads, 640/64 = 10 text heads). The activation is not
    visible either: OpenCLIP models use exact GELU unless their name ends in
    `-quickgelu` (OpenAI weights).

    Args:
      sd: OpenCLIP state dict (`visual.*`, `token_embedding.weight`, ...).
      hidden_act: `"gelu"` or `"quick_gelu"`.
      head_width: attention head width used to derive head counts.

    Returns:
      The spec of the model that `sd` belongs to.
    """
    d, _, p, _ = sd["visual.conv1.weight"].shape
    w = sd["token_embedding.weight"].shape[1]
    for width in (d, w):
        if width % head_width or width < head_width:
            raise ValueError(f"width {width} is not a multiple of head_width {head_width}.")
    n_pos = sd["visual.positional_embedding"].shape[0]
    side = math.isqrt(n_pos - 1)
    if side * side != n_pos - 1:
        raise ValueError(f"visual.positional_embedding has {n_pos} rows: not 1 + a square grid.")
    vocab = sd["token_embedding.weight"].shape[0]
    return ClipSpec(
        image_size=side * p,
        patch_size=p,
        vision_width=d,
        vision_layers=_block_keys(sd, "visual.transformer.resblocks."),
        vision_heads=d // head_width,
        vision_mlp=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        text_width=w,
        text_layers=_block_keys(sd, "transformer.resblocks."),
        text_heads=w // head_width,
        text_mlp=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=vocab,
        embed_dim=sd["visual.proj"].shape[1],
        hidden_act=hidden_act,
    )


def openclip_to_hf_state_dict(
    sd: Mapping[str, np.ndarray], spec: ClipSpec
) -> dict[str, np.ndarray]:
    """Converts an OpenCLIP CLIP state dict to an HF `CLIPModel` state dict.

    The fused attention projection `in_proj_weight` `[3D, D]` / `in_proj_bias`
    `[3D]` is split into q, k, v (in that order, as `nn.MultiheadAttention`
    packs them). `visual.proj` / `text_projection` (`x @ proj`) become the
    bias-free HF projections (`weight = proj.T`).

    Args:
      sd: OpenCLIP state dict, arrays in numpy; an optional `module.` prefix
        (DDP checkpoints) must be stripped before.
      spec: the architecture (e.g. from `infer_openclip_spec`); shapes are
        checked against it.

    Returns:
      HF PyTorch-layout state dict (keys as in `model.safetensors`).

    Raises:
      ValueError: on keys this converter does not understand (e.g. an
        attention-pool or non-CLIP head) or shapes that disagree with `spec`.
    """
    out: dict[str, np.ndarray] = {}
    v, t = "vision_model.", "text_model."
    out[v + "embeddings.class_embedding"] = sd["visual.class_embedding"]
    out[v + "embeddings.position_embedding.weight"] = sd["visual.positional_embedding"]
    out[v + "embeddings.patch_embedding.weight"] = sd["visual.conv1.weight"]
    for kind in ("weight", "bias"):
        out[f"{v}pre_layrnorm.{kind}"] = sd[f"visual.ln_pre.{kind}"]
        out[f"{v}post_layernorm.{kind}"] = sd[f"visual.ln_post.{kind}"]
        out[f"{t}final_layer_norm.{kind}"] = sd[f"ln_final.{kind}"]
    out["visual_projection.weight"] = sd["visual.proj"].T
    out[t + "embeddings.token_embedding.weight"] = sd["token_embedding.weight"]
    out[t + "embeddings.position_embedding.weight"] = sd["positional_embedding"]
    if "text_projection.weight" in sd:  # some OpenCLIP variants use nn.Linear
        out["text_projection.weight"] = sd["text_projection.weight"]
        used = {"text_projection.weight"}
    else:
        out["text_projection.weight"] = sd["text_projection"].T
        used = {"text_projection"}
    out["logit_scale"] = np.asarray(sd["logit_scale"]).reshape(())
    used |= {
        "visual.class_embedding",
        "visual.positional_embedding",
        "visual.conv1.weight",
        "visual.proj",
        "token_embedding.weight",
        "positional_embedding",
        "logit_scale",
    }
    used |= {
        f"{n}.{k}"
        for n in ("visual.ln_pre", "visual.ln_post", "ln_final")
        for k in ("weight", "bias")
    }
    used |= _convert_tower(
        sd, "visual.transformer.resblocks.", v + "encoder.layers.", spec.vision_layers, out
    )
    used |= _convert_tower(
        sd, "transformer.resblocks.", t + "encoder.layers.", spec.text_layers, out
    )
    unknown = sorted(k for k in sd if k not in used and not _OPENCLIP_IGNORED.match(k))
    if unknown:
        raise ValueError(
            f"OpenCLIP state dict has {len(unknown)} keys this converter does not map "
            f"(not a plain CLIP ViT?): {unknown[:8]}"
        )
    check_hf_state_dict(out, spec)
    return out


def _hf_shapes(spec: ClipSpec) -> dict[str, tuple[int, ...]]:
    """Expected HF PyTorch-layout shapes of every weight of `spec`."""
    shapes: dict[str, tuple[int, ...]] = {"logit_scale": ()}
    d, w, e, p = spec.vision_width, spec.text_width, spec.embed_dim, spec.patch_size
    g = spec.grid_size[0] * spec.grid_size[1]
    shapes["vision_model.embeddings.class_embedding"] = (d,)
    shapes["vision_model.embeddings.position_embedding.weight"] = (g + 1, d)
    shapes["vision_model.embeddings.patch_embedding.weight"] = (d, 3, p, p)
    shapes["text_model.embeddings.token_embedding.weight"] = (spec.vocab_size, w)
    shapes["text_model.embeddings.position_embedding.weight"] = (spec.context_length, w)
    shapes["visual_projection.weight"] = (e, d)
    shapes["text_projection.weight"] = (e, w)
    for name, width in (("vision_model.pre_layrnorm", d), ("vision_model.post_layernorm", d)):
        shapes[name + ".weight"] = shapes[name + ".bias"] = (width,)
    shapes["text_model.final_layer_norm.weight"] = (w,)
    shapes["text_model.final_layer_norm.bias"] = (w,)
    for tower, width, mlp, layers in (
        ("vision_model", d, spec.vision_mlp, spec.vision_layers),
        ("text_model", w, spec.text_mlp, spec.text_layers),
    ):
        for i in range(layers):
            base = f"{tower}.encoder.layers.{i}."
            for ln in ("layer_norm1", "layer_norm2"):
                shapes[base + ln + ".weight"] = shapes[base + ln + ".bias"] = (width,)
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                shapes[f"{base}self_attn.{proj}.weight"] = (width, width)
                shapes[f"{base}self_attn.{proj}.bias"] = (width,)
            shapes[base + "mlp.fc1.weight"] = (mlp, width)
            shapes[base + "mlp.fc1.bias"] = (mlp,)
            shapes[base + "mlp.fc2.weight"] = (width, mlp)
            shapes[base + "mlp.fc2.bias"] = (width,)
    return shapes


def check_hf_state_dict(sd: Mapping[str, np.ndarray], spec: ClipSpec) -> None:
    """Raises `ValueError` if `sd` lacks, adds or misshapes any weight of `spec`."""
    expected = _hf_shapes(spec)
    keys = {k for k in sd if not _HF_IGNORED.match(k)}
    missing = sorted(set(expected) - keys)
    unexpected = sorted(keys - set(expected))
    wrong = sorted(
        f"{k}: {tuple(np.shape(sd[k]))} != {expected[k]}"
        for k in set(expected) & keys
        if tuple(np.shape(sd[k])) != expected[k]
    )
    if missing or unexpected or wrong:
        raise ValueError(
            "state dict does not match the CLIP config: "
            f"missing {missing[:8]}, unexpected {unexpected[:8]}, wrong shapes {wrong[:8]}"
        )


def hf_state_dict_to_flax(sd: Mapping[str, np.ndarray], spec: ClipSpec) -> Params:
    """Converts an HF PyTorch-layout CLIP state dict to the HF Flax param tree.

    Linear weights are transposed to Dense kernels `[in, out]`, the patch conv
    goes OIHW -> HWIO, LayerNorm `weight` -> `scale`, embedding tables
    `weight` -> `embedding`. Arrays are cast to float32.

    Args:
      sd: HF PyTorch-layout state dict (`model.safetensors` contents).
      spec: architecture; the dict must match it exactly.

    Returns:
      Nested dict usable as `{"params": tree}` for `FlaxCLIPModule`.
    """
    check_hf_state_dict(sd, spec)
    tree: Params = {}
    for key, value in sd.items():
        if _HF_IGNORED.match(key):
            continue
        parts = key.split(".")
        leaf = parts[-1]
        value = np.asarray(value, dtype=np.float32)
        parent = parts[-2] if len(parts) > 1 else ""
        if leaf == "weight":
            if parent == "patch_embedding":
                parts[-1], value = "kernel", value.transpose(2, 3, 1, 0)
            elif parent in ("token_embedding", "position_embedding"):
                parts[-1] = "embedding"
            elif parent.startswith(("layer_norm", "pre_layrnorm", "post_layernorm", "final_layer")):
                parts[-1] = "scale"
            else:
                parts[-1], value = "kernel", value.T
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = np.array(value, order="C")
    return tree


def flax_to_hf_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inverse of `hf_state_dict_to_flax` (Flax param tree -> HF PyTorch layout)."""
    out: dict[str, np.ndarray] = {}

    def visit(node: Mapping[str, Any], path: list[str]) -> None:
        for name, child in node.items():
            if isinstance(child, Mapping):
                visit(child, path + [name])
                continue
            value = np.asarray(child)
            if name == "kernel":
                name = "weight"
                value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
            elif name in ("scale", "embedding"):
                name = "weight"
            out[".".join(path + [name])] = np.array(value, order="C")

    visit(params, [])
    return out
