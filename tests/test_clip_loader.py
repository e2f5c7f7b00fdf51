"""Loading CLIP folders, converting OpenCLIP files, torch-free .bin reading, errors."""

import collections
import dataclasses
import gzip
import io
import json
import pickle
import sys
import types
import zipfile

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import serialization
from flax.traverse_util import flatten_dict
from test_clip_convert import SPEC, random_openclip_state_dict
from transformers import FlaxCLIPModel

from protorefine_jax.clip import convert, winclip
from protorefine_jax.clip.spec import CLIP_MEAN, CLIP_STD
from protorefine_jax.io import clip_folder as loader
from protorefine_jax.io.errors import CheckpointError

MERGES = ["h e", "l l", "he ll"]
BPE_TEXT = "#version: 0.2\n" + "\n".join(MERGES) + "\n"
VOCAB = 512 + len(MERGES) + 2


def _spec():
    """Vocabulary of the tiny BPE file; widths 64 so OpenCLIP's head width 64 gives 1 head."""
    return dataclasses.replace(
        SPEC,
        vocab_size=VOCAB,
        vision_width=64,
        vision_heads=1,
        text_width=64,
        text_heads=1,
    )


def _write_bpe(path):
    path.write_bytes(gzip.compress(BPE_TEXT.encode()))
    return path


# ---- a torch.save-format writer that needs no torch ----------------------------------


def write_torch_zip(path, obj, transpose_keys=(), bf16_keys=()):
    """Pickle `obj` (arrays become torch tensors) the way torch.save lays out a zip."""
    fake_torch = types.ModuleType("torch")
    fake_utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called while writing")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    fake_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    storage_types = {}
    for name in ("FloatStorage", "BFloat16Storage"):
        storage_types[name] = type(name, (), {"__module__": "torch"})
        setattr(fake_torch, name, storage_types[name])
    fake_torch._utils = fake_utils
    storages = {}

    class StorageRef:
        def __init__(self, kind, key, numel):
            self.kind, self.key, self.numel = kind, key, numel

    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, StorageRef):
                return ("storage", storage_types[o.kind], o.key, "cpu", o.numel)
            return None

        def reducer_override(self, o):
            if not isinstance(o, np.ndarray):
                return NotImplemented
            key = str(len(storages))
            kind = "FloatStorage"
            base = np.array(o, order="C")
            shape, stride = base.shape, base.strides
            if id(o) in transpose_ids:  # store transposed, describe by strides
                base = np.ascontiguousarray(o.T)
                shape = o.shape
                stride = tuple(reversed(base.strides))
            elem = tuple(s // base.itemsize for s in stride)
            if id(o) in bf16_ids:
                kind, base = "BFloat16Storage", base.astype(ml_dtypes.bfloat16)
            storages[key] = base.tobytes()
            ref = StorageRef(kind, key, base.size)
            return (_rebuild_tensor_v2, (ref, 0, shape, elem, False, collections.OrderedDict()))

    flat = obj["state_dict"] if "state_dict" in obj else obj
    transpose_ids = {id(v) for k, v in flat.items() if k in transpose_keys}
    bf16_ids = {id(v) for k, v in flat.items() if k in bf16_keys}
    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules["torch"], sys.modules["torch._utils"] = fake_torch, fake_utils
    try:
        buf = io.BytesIO()
        Pickler(buf, protocol=2).dump(obj)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/version", "3\n")
        for key, raw in storages.items():
            z.writestr(f"archive/data/{key}", raw)
    return path


# ---- tests ---------------------------------------------------------------------------


def test_missing_folder_names_every_file(tmp_path):
    folder = tmp_path / "clip"
    with pytest.raises(FileNotFoundError) as err:
        loader.load_clip(folder)
    msg = str(err.value)
    assert "does not exist" in msg
    for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt"):
        assert name in msg
    assert "bpe_simple_vocab_16e6.txt.gz" in msg and "convert_openclip" in msg
    assert str(folder) in msg


def test_incomplete_folder_names_only_missing(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(
        FileNotFoundError, match=r"is incomplete: missing merges.txt, model.safetensors\."
    ):
        loader.load_clip(tmp_path)


def test_openclip_npz_to_folder_to_params(tmp_path):
    spec = _spec()
    sd = random_openclip_state_dict(spec, seed=3)
    np.savez(tmp_path / "oc.npz", **sd)
    folder = loader.convert_openclip(
        tmp_path / "oc.npz", _write_bpe(tmp_path / "bpe.txt.gz"), tmp_path / "hf", model_name=None
    )
    bundle = loader.load_clip(folder)
    assert bundle.spec == convert.infer_openclip_spec(sd)
    want = convert.hf_state_dict_to_flax(convert.openclip_to_hf_state_dict(sd, spec), spec)
    got, ref = flatten_dict(bundle.params), flatten_dict(want)
    assert set(got) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k])
    # Cross-check against Hugging Face's own PyTorch->Flax conversion (no torch needed).
    # (HF's converter needs an initialised model: eager random init, the slow part here.)
    hf = flatten_dict(FlaxCLIPModel.from_pretrained(str(folder), from_pt=True).params)
    for k in ref:
        np.testing.assert_allclose(hf[k], ref[k], rtol=0, atol=0)
    assert bundle.tokenizer(["hello"])["input_ids"] == [[VOCAB - 2, 514, 334, VOCAB - 1]]


def test_torch_zip_checkpoint(tmp_path):
    spec = _spec()
    sd = random_openclip_state_dict(spec, seed=4)
    sd.pop("logit_scale")
    ckpt = {
        "epoch": 31,
        "state_dict": collections.OrderedDict(("module." + k, v) for k, v in sd.items()),
    }
    ckpt["state_dict"]["module.logit_scale"] = np.array(2.0, np.float32)
    path = write_torch_zip(
        tmp_path / "oc.pt",
        ckpt,
        transpose_keys=("module.visual.proj",),
        bf16_keys=("module.ln_final.weight",),
    )
    got = loader.read_state_dict(path)
    assert "logit_scale" in got and got["logit_scale"].shape == ()
    np.testing.assert_array_equal(got["visual.proj"], sd["visual.proj"])
    bf16 = sd["ln_final.weight"].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(got["ln_final.weight"], bf16)
    np.testing.assert_array_equal(got["visual.conv1.weight"], sd["visual.conv1.weight"])
    out = loader.convert_openclip(path, _write_bpe(tmp_path / "bpe.gz"), tmp_path / "hf", None)
    assert loader.missing_clip_files(out) == []


def test_torch_zip_rejects_foreign_globals(tmp_path):
    buf = pickle.dumps({"x": collections.Counter()}, protocol=2)
    with zipfile.ZipFile(tmp_path / "bad.bin", "w") as z:
        z.writestr("archive/data.pkl", buf)
    with pytest.raises(CheckpointError, match="collections.Counter"):
        loader.read_state_dict(tmp_path / "bad.bin")
    (tmp_path / "junk.pth").write_bytes(b"\x80\x02junk")
    with pytest.raises(CheckpointError, match="junk.pth"):
        loader.read_state_dict(tmp_path / "junk.pth")


def test_flax_msgpack_folder(tmp_path):
    spec = _spec()
    sd = random_openclip_state_dict(spec, seed=5)
    folder = loader.write_clip_folder(
        tmp_path, convert.openclip_to_hf_state_dict(sd, spec), spec, BPE_TEXT
    )
    params = loader.load_clip(folder).params
    (folder / "model.safetensors").unlink()
    (folder / "flax_model.msgpack").write_bytes(
        serialization.msgpack_serialize(jax.tree.map(np.asarray, params))
    )
    again = flatten_dict(loader.load_clip(folder).params)
    for k, v in flatten_dict(params).items():
        np.testing.assert_array_equal(again[k], v)


def test_conversion_errors(tmp_path):
    spec = _spec()
    sd = random_openclip_state_dict(spec)
    np.savez(tmp_path / "oc.npz", **sd)
    bpe = _write_bpe(tmp_path / "bpe.gz")
    with pytest.raises(ValueError, match="does not hold a ViT-B-16-plus-240"):
        loader.convert_openclip(tmp_path / "oc.npz", bpe, tmp_path / "a", "ViT-B-16-plus-240")
    with pytest.raises(ValueError, match="unknown model"):
        loader.convert_openclip(tmp_path / "oc.npz", bpe, tmp_path / "a", "ViT-H-14")
    with pytest.raises(FileNotFoundError, match="open_clip_torch"):
        loader.convert_openclip(tmp_path / "oc.npz", tmp_path / "nope.gz", tmp_path / "a", None)
    with pytest.raises(FileNotFoundError, match="weight file"):
        loader.read_state_dict(tmp_path / "missing.safetensors")
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(b"#version: 0.2\nh e\n"))
    with pytest.raises(ValueError, match="vocabulary of 515 tokens but the weights have 517"):
        loader.convert_openclip(tmp_path / "oc.npz", short, tmp_path / "b", None)


def test_preprocessor_config_sets_the_jitted_normalisation(tmp_path):
    spec = _spec()
    hf_sd = convert.openclip_to_hf_state_dict(random_openclip_state_dict(spec, seed=7), spec)
    folder = loader.write_clip_folder(tmp_path / "hf", hf_sd, spec, BPE_TEXT)
    default = loader.load_clip(folder)
    assert (default.spec.image_mean, default.spec.image_std) == (CLIP_MEAN, CLIP_STD)
    mean, std = (0.5, 0.25, 0.75), (0.2, 0.3, 0.4)
    cfg_path = folder / "preprocessor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(image_mean=list(mean), image_std=list(std))
    cfg_path.write_text(json.dumps(cfg))
    custom = loader.load_clip(folder)
    assert custom.spec == dataclasses.replace(default.spec, image_mean=mean, image_std=std)
    hash(custom.spec)  # still a valid static jit argument

    # The jitted extraction normalises with the folder's mean/std: images x under the
    # custom normalisation equal images y under OpenAI's when the normalised pixels match.
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    z = (x / 255.0 - np.array(mean)) / np.array(std)
    y = (255.0 * (z * np.array(CLIP_STD) + np.array(CLIP_MEAN))).astype(np.float32)

    def features(bundle, images):
        cfg = winclip.winclip_config(use_refinement=False, clip=bundle.spec, window_sizes=(2,))
        return winclip.extract_multiscale(bundle.params, images, cfg)

    got, same, plain = features(custom, x), features(default, y), features(default, x)
    leaves = [jax.tree.leaves(f) for f in (got, same, plain)]
    for a, b, c in zip(*leaves, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
        assert not np.allclose(a, c, atol=1e-3)

    # write_clip_folder writes the spec's normalisation back; no file -> OpenAI values.
    again = loader.write_clip_folder(tmp_path / "hf2", hf_sd, custom.spec, BPE_TEXT)
    assert loader.load_clip(again).spec == custom.spec
    cfg_path.unlink()
    assert loader.read_normalization(folder) == (CLIP_MEAN, CLIP_STD)
    cfg_path.write_text(json.dumps({"do_normalize": False, "image_mean": 0.5}))
    assert loader.read_normalization(folder) == ((0.0,) * 3, (1.0,) * 3)
    cfg_path.write_text(json.dumps({"image_mean": 0.5, "image_std": [1, 2]}))
    with pytest.raises(ValueError, match="image_std must be a number or 3 numbers"):
        loader.read_normalization(folder)
    # Issue 13 item 7: non-finite and subnormal values (JSON NaN / Infinity).
    for text, msg in (
        ('{"image_std": NaN}', "image_std must be finite"),
        ('{"image_mean": [0.5, Infinity, 0.5]}', "image_mean must be finite"),
        ('{"image_std": 1e-320}', r"image_std must be >= 1e-06"),
    ):
        cfg_path.write_text(text)
        with pytest.raises(ValueError, match=msg):
            loader.read_normalization(folder)
