"""OpenCLIP -> HF conversion against an independent numpy float64 OpenCLIP forward."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from scipy.special import erf
from transformers import FlaxCLIPModel

from protorefine_jax.clip import convert, towers
from protorefine_jax.clip.spec import ClipSpec, clip_module

SPEC = ClipSpec(
    image_size=32,
    patch_size=8,
    vision_width=32,
    vision_layers=2,
    vision_heads=2,
    vision_mlp=64,
    text_width=32,
    text_layers=2,
    text_heads=2,
    text_mlp=64,
    context_length=12,
    vocab_size=40,
    embed_dim=16,
)
HEAD_WIDTH = 16  # 32 wide / 2 heads in both towers


def random_openclip_state_dict(spec: ClipSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """OpenCLIP-layout weights (keys and shapes of open_clip's VisionTransformer/CLIP)."""
    rng = np.random.default_rng(seed)
    sd = {}

    def normal(shape, std=0.1):
        return (std * rng.standard_normal(shape)).astype(np.float32)

    def layernorm(name, width):
        sd[name + ".weight"] = 1.0 + normal((width,))
        sd[name + ".bias"] = normal((width,))

    def tower(prefix, width, mlp, layers):
        for i in range(layers):
            p = f"{prefix}{i}."
            layernorm(p + "ln_1", width)
            layernorm(p + "ln_2", width)
            sd[p + "attn.in_proj_weight"] = normal((3 * width, width), 0.2)
            sd[p + "attn.in_proj_bias"] = normal((3 * width,))
            sd[p + "attn.out_proj.weight"] = normal((width, width), 0.2)
            sd[p + "attn.out_proj.bias"] = normal((width,))
            sd[p + "mlp.c_fc.weight"] = normal((mlp, width), 0.2)
            sd[p + "mlp.c_fc.bias"] = normal((mlp,))
            sd[p + "mlp.c_proj.weight"] = normal((width, mlp), 0.2)
            sd[p + "mlp.c_proj.bias"] = normal((width,))

    d, w, p = spec.vision_width, spec.text_width, spec.patch_size
    g = spec.grid_size[0] * spec.grid_size[1]
    sd["visual.class_embedding"] = normal((d,), 0.5)
    sd["visual.positional_embedding"] = normal((g + 1, d), 0.5)
    sd["visual.conv1.weight"] = normal((d, 3, p, p), 0.05)
    layernorm("visual.ln_pre", d)
    tower("visual.transformer.resblocks.", d, spec.vision_mlp, spec.vision_layers)
    layernorm("visual.ln_post", d)
    sd["visual.proj"] = normal((d, spec.embed_dim), 0.3)
    sd["token_embedding.weight"] = normal((spec.vocab_size, w), 0.5)
    sd["positional_embedding"] = normal((spec.context_length, w), 0.3)
    tower("transformer.resblocks.", w, spec.text_mlp, spec.text_layers)
    layernorm("ln_final", w)
    sd["text_projection"] = normal((w, spec.embed_dim), 0.3)
    sd["logit_scale"] = np.array(np.log(1 / 0.07), np.float32)
    sd["attn_mask"] = np.triu(np.full((spec.context_length,) * 2, -np.inf, np.float32), 1)
    return sd


# ---- independent float64 reference of OpenCLIP's forward -----------------------------


def _ln(x, sd, name, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * sd[name + ".weight"] + sd[name + ".bias"]


def _mha(x, sd, p, heads, mask=None):
    """nn.MultiheadAttention with the fused in_proj (q, k, v stacked on rows)."""
    b, t, width = x.shape
    hd = width // heads
    qkv = x @ sd[p + "in_proj_weight"].T + sd[p + "in_proj_bias"]
    q, k, v = (a.reshape(b, t, heads, hd).transpose(0, 2, 1, 3) for a in np.split(qkv, 3, -1))
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    if mask is not None:
        logits = logits + mask
    att = np.exp(logits - logits.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    out = (att @ v).transpose(0, 2, 1, 3).reshape(b, t, width)
    return out @ sd[p + "out_proj.weight"].T + sd[p + "out_proj.bias"]


def _transformer(x, sd, prefix, layers, heads, mask=None):
    for i in range(layers):
        p = f"{prefix}{i}."
        x = x + _mha(_ln(x, sd, p + "ln_1"), sd, p + "attn.", heads, mask)
        h = _ln(x, sd, p + "ln_2") @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"]
        h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))  # nn.GELU (exact)
        x = x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
    return x


def ref_tokens(sd, spec, pixels_nchw):
    """conv1 -> flatten -> [CLS; patches] + positional embedding (before ln_pre)."""
    b, _, s, _ = pixels_nchw.shape
    p, g = spec.patch_size, s // spec.patch_size
    patches = pixels_nchw.reshape(b, 3, g, p, g, p).transpose(0, 2, 4, 1, 3, 5)
    tokens = np.einsum("bijcuv,dcuv->bijd", patches, sd["visual.conv1.weight"]).reshape(
        b, g * g, -1
    )
    cls = np.broadcast_to(sd["visual.class_embedding"], (b, 1, tokens.shape[-1]))
    return np.concatenate([cls, tokens], 1) + sd["visual.positional_embedding"]


def ref_vision(sd, spec, tokens, project_tokens=True):
    """ln_pre, transformer, ln_post on all tokens; returns (CLS @ proj, patch tokens).

    Patch tokens `@ proj` if `project_tokens`, else as OpenCLIP's `output_tokens`
    returns them (after ln_post, unprojected), which anomalib's WinCLIP scores with.
    """
    x = _ln(tokens, sd, "visual.ln_pre")
    x = _transformer(x, sd, "visual.transformer.resblocks.", spec.vision_layers, spec.vision_heads)
    x = _ln(x, sd, "visual.ln_post")
    patches = x[:, 1:] @ sd["visual.proj"] if project_tokens else x[:, 1:]
    return x[:, 0] @ sd["visual.proj"], patches


def ref_text(sd, spec, ids):
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"]
    mask = np.triu(np.full((ids.shape[1],) * 2, -np.inf), 1)
    x = _transformer(x, sd, "transformer.resblocks.", spec.text_layers, spec.text_heads, mask)
    x = _ln(x, sd, "ln_final")
    return x[np.arange(len(ids)), ids.argmax(-1)] @ sd["text_projection"]


# ---- tests ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted():
    spec = SPEC
    sd = random_openclip_state_dict(spec)
    hf_sd = convert.openclip_to_hf_state_dict(sd, spec)
    params = jax.tree.map(jnp.asarray, convert.hf_state_dict_to_flax(hf_sd, spec))
    sd64 = {k: v.astype(np.float64) for k, v in sd.items()}
    pixels = np.random.default_rng(1).standard_normal((2, 3, 32, 32))
    return spec, sd64, params, pixels


def test_infer_spec_from_weights(converted):
    spec, sd, _, _ = converted
    assert convert.infer_openclip_spec(sd, head_width=HEAD_WIDTH) == spec


def test_image_embedding_matches_reference(converted):
    spec, sd, params, pixels = converted
    want, _ = ref_vision(sd, spec, ref_tokens(sd, spec, pixels))
    model = FlaxCLIPModel(spec.to_hf_config(), _do_init=False)
    hf = model.get_image_features(jnp.asarray(pixels, jnp.float32), params=params)
    nhwc = jnp.asarray(pixels.transpose(0, 2, 3, 1), jnp.float32)
    ours = jax.jit(towers.encode_image, static_argnums=0)(spec, params, nhwc)
    scale = np.abs(want).max()
    np.testing.assert_allclose(hf, want, atol=2e-5 * scale, rtol=0)
    np.testing.assert_allclose(ours, want, atol=2e-5 * scale, rtol=0)


def test_patch_tokens_and_windows_match_reference(converted):
    spec, sd, params, pixels = converted
    tokens = ref_tokens(sd, spec, pixels)  # [B, 1 + 16, D]
    want_image, want_patches = ref_vision(sd, spec, tokens)
    # 4x4 grid, 2x2 windows: window (r, c) holds patches (r..r+1, c..c+1).
    want_windows = []
    for r in range(3):
        for c in range(3):
            cells = [1 + (r + a) * 4 + (c + b) for a in range(2) for b in range(2)]
            cls_out, _ = ref_vision(sd, spec, tokens[:, [0] + cells])
            want_windows.append(cls_out)
    want_windows = np.stack(want_windows, 1)  # [B, 9, E]

    images = (
        pixels.transpose(0, 2, 3, 1) * np.array(towers.CLIP_STD) + np.array(towers.CLIP_MEAN)
    ) * 255
    encode = jax.jit(towers.encode_multiscale, static_argnums=(0, 3, 4))
    feats = encode(spec, params, jnp.asarray(images, jnp.float32), (2, 3), True)
    scale = np.abs(want_windows).max()
    np.testing.assert_allclose(feats.image, want_image, atol=5e-5 * scale, rtol=0)
    np.testing.assert_allclose(feats.patches, want_patches, atol=5e-5 * scale, rtol=0)
    np.testing.assert_allclose(feats.windows[0], want_windows, atol=5e-5 * scale, rtol=0)
    assert feats.windows[1].shape == (2, 4, spec.embed_dim)
    # The default (anomalib's): patch tokens after ln_post, unprojected, D wide.
    _, want_raw = ref_vision(sd, spec, tokens, project_tokens=False)
    raw = towers.encode_multiscale(spec, params, jnp.asarray(images, jnp.float32))
    assert raw.patches.shape == (2, 16, spec.vision_width)
    raw_scale = np.abs(want_raw).max()
    np.testing.assert_allclose(raw.patches, want_raw, atol=5e-5 * raw_scale, rtol=0)


def test_text_embedding_matches_reference(converted):
    spec, sd, params, _ = converted
    eot = spec.vocab_size - 1
    ids = np.array(
        [
            [eot - 1, 5, 7, 9, eot] + [0] * 7,  # OpenCLIP pads with 0
            [eot - 1, 3, 30, 2, 11, 4, 6, eot, 0, 0, 0, 0],
        ]
    )
    want = ref_text(sd, spec, ids)
    model = FlaxCLIPModel(spec.to_hf_config(), _do_init=False)
    hf = model.get_text_features(jnp.asarray(ids), params=params)
    encode = jax.jit(towers.encode_text, static_argnums=0)
    ours = encode(spec, params, ids)
    scale = np.abs(want).max()
    np.testing.assert_allclose(hf, want, atol=2e-5 * scale, rtol=0)
    np.testing.assert_allclose(ours, want, atol=2e-5 * scale, rtol=0)
    # Padding with <|endoftext|> (the HF tokenizer's pad) pools at the same position.
    padded = np.where(np.arange(12) > ids.argmax(-1)[:, None], eot, ids)
    np.testing.assert_allclose(encode(spec, params, padded), ours, atol=1e-6)


def test_in_proj_split_order():
    spec = SPEC
    sd = random_openclip_state_dict(spec)
    hf = convert.openclip_to_hf_state_dict(sd, spec)
    w = sd["visual.transformer.resblocks.1.attn.in_proj_weight"]
    d = spec.vision_width
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        key = f"vision_model.encoder.layers.1.self_attn.{name}.weight"
        np.testing.assert_array_equal(hf[key], w[i * d : (i + 1) * d])
    np.testing.assert_array_equal(hf["visual_projection.weight"], sd["visual.proj"].T)


def test_param_tree_matches_hf_init(converted):
    spec, _, params, _ = converted
    module = clip_module(spec)
    ids = jnp.zeros((1, spec.context_length), jnp.int32)
    pixels = jnp.zeros((1, spec.image_size, spec.image_size, 3))
    init = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids, pixels, ids, ids))
    want = {k: v.shape for k, v in flatten_dict(init["params"]).items()}
    got = {k: v.shape for k, v in flatten_dict(params).items()}
    assert got == want


def test_flax_hf_round_trip(converted):
    spec, _, params, _ = converted
    hf_sd = convert.flax_to_hf_state_dict(jax.tree.map(np.asarray, params))
    convert.check_hf_state_dict(hf_sd, spec)
    back = flatten_dict(convert.hf_state_dict_to_flax(hf_sd, spec))
    ref = flatten_dict(params)
    assert set(back) == set(ref)
    for key, value in ref.items():
        np.testing.assert_array_equal(back[key], value)


def test_unknown_keys_and_bad_shapes_raise():
    spec = SPEC
    sd = random_openclip_state_dict(spec)
    sd["visual.attn_pool.query"] = np.zeros((4, 32), np.float32)
    with pytest.raises(ValueError, match="does not map.*attn_pool"):
        convert.openclip_to_hf_state_dict(sd, spec)
    sd = random_openclip_state_dict(spec)
    wrong = dataclasses.replace(spec, embed_dim=8)
    with pytest.raises(ValueError, match="wrong shapes.*visual_projection"):
        convert.openclip_to_hf_state_dict(sd, wrong)
    hf = convert.openclip_to_hf_state_dict(sd, spec)
    del hf["text_model.final_layer_norm.bias"]
    with pytest.raises(ValueError, match="missing.*final_layer_norm.bias"):
        convert.hf_state_dict_to_flax(hf, spec)
