"""Untrusted files, second round: image decoders, shared pickle references, CLIP configs.

Every hostile file is built here at test time (nothing binary is committed).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from crafted import MAGIC, zip_checkpoint
from PIL import EpsImagePlugin, Image, ImageFile

from protorefine_jax.clip.spec import ClipSpec
from protorefine_jax.data import imageio
from protorefine_jax.data.errors import CorruptImageError, ImageTooLargeError
from protorefine_jax.data.folder import load_category
from protorefine_jax.data.synthetic import make_synthetic_dataset
from protorefine_jax.io import clip_folder
from protorefine_jax.io.errors import CheckpointError
from protorefine_jax.io.safe_pickle import load_plain
from protorefine_jax.io.torch_checkpoint import load_state_dict

# ---------------------------------------------------------------------------
# 1. Images: only the allowed decoders, and a decode budget in bytes.

EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n"
    b"%%BoundingBox: 0 0 10 10\n"
    b"%%EndComments\n"
    b"newpath 0 0 moveto 10 10 lineto stroke\n"
    b"showpage\n"
    b"%%EOF\n"
)


@pytest.fixture
def fake_gs(tmp_path, monkeypatch):
    """A `gs` first on PATH that logs its arguments: the log exists iff it ran."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "gs.log"
    gs = bin_dir / "gs"
    gs.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\nexit 1\n')
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # PIL caches the lookup
    return log


def _not_allowed(path: Path):
    return pytest.raises(
        CorruptImageError,
        match=rf"{path.name}: its content is not an allowed image format \(PNG, JPEG",
    )


def test_eps_named_png_never_reaches_ghostscript(tmp_path, fake_gs):
    path = tmp_path / "part_001.png"
    path.write_bytes(EPS)
    with _not_allowed(path):
        imageio.open_image(path)
    with _not_allowed(path):
        imageio.read_image(path, 16)
    with _not_allowed(path):
        imageio.read_mask(path, 16, 127)
    with _not_allowed(path):
        imageio.image_pixel_size(path)
    assert not fake_gs.exists()


def test_eps_in_a_dataset_folder_never_reaches_ghostscript(tmp_path, fake_gs):
    root = tmp_path / "ds"
    make_synthetic_dataset(root, ("fabric",), 2, 1, 1, image_size=32, seed=0)
    data = load_category(root, "fabric", image_size=16)
    victim = data.train_good[0]
    victim.write_bytes(EPS)
    with _not_allowed(victim):
        data.load_images(data.train_good)
    item = next(t for t in data.test if t.mask_path is not None)
    item.mask_path.write_bytes(EPS)
    with _not_allowed(item.mask_path):
        data.load_masks([item])
    assert not fake_gs.exists()


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PPM", "ICO", "TGA"])
def test_other_formats_are_refused_whatever_the_name(tmp_path, fmt):
    path = tmp_path / "img.png"
    Image.fromarray(np.full((8, 8, 3), 9, np.uint8)).save(path, format=fmt)
    with _not_allowed(path):
        imageio.read_image(path, 8)


@pytest.mark.parametrize(
    ("fmt", "name"),
    [("PNG", "a.png"), ("JPEG", "a.jpg"), ("BMP", "a.bmp"), ("TIFF", "a.tif"), ("JPEG", "b.png")],
)
def test_allowed_formats_still_decode(tmp_path, fmt, name):
    path = tmp_path / name
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(path, format=fmt)
    out = imageio.read_image(path, 4)
    assert out.shape == (4, 4, 3) and abs(int(out.mean()) - 200) <= 2


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def header_png(path: Path, width: int, height: int, depth: int, color: int) -> Path:
    """A PNG header claiming a size (and a token IDAT): enough for PIL's lazy open."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    chunks = [_chunk(b"IHDR", ihdr)]
    if color == 3:
        chunks.append(_chunk(b"PLTE", b"\0\0\0"))
    chunks += [_chunk(b"IDAT", zlib.compress(b"\0")), _chunk(b"IEND", b"")]
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"".join(chunks))
    return path


@pytest.fixture
def no_decode(monkeypatch):
    def load(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_sixteen_bit_png_refused_by_the_byte_budget(tmp_path, no_decode):
    # 7071^2 = 49.99 MP: under the pixel limit, but a 16-bit read peaks near 1.8 GB.
    path = header_png(tmp_path / "deep.png", 7071, 7071, 16, 0)
    with pytest.raises(
        ImageTooLargeError,
        match=r"deep\.png is 7071 x 7071 pixels of PIL mode 'I;16.*': reading it takes "
        r"about 1\.60 GB, more than the budget of 0\.60 GB .*--max_image_pixels.*8-bit",
    ):
        imageio.read_image(path, 64)
    with pytest.raises(ImageTooLargeError, match="I;16"):
        imageio.read_mask(path, 64, 127)


def test_byte_budget_keeps_the_pixel_limit_for_8_bit_files(tmp_path, monkeypatch):
    calls = []

    def load(self):
        calls.append(self.size)
        raise OSError("stop after the checks")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    for color, depth in ((2, 8), (6, 8), (0, 8), (3, 8), (0, 1)):  # RGB, RGBA, L, P, 1
        path = header_png(tmp_path / f"c{color}d{depth}.png", 7071, 7071, depth, color)
        with pytest.raises(CorruptImageError, match="stop after the checks"):
            imageio.read_image(path, 64)
    assert calls == [(7071, 7071)] * 5  # reached the decode: allowed by the budget


def test_pixel_limit_is_per_call_and_leaves_pil_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    monkeypatch.setattr(imageio, "_max_pixels", imageio._max_pixels)
    pil_before = Image.MAX_IMAGE_PIXELS
    path = tmp_path / "img.png"
    Image.fromarray(np.full((20, 30), 7, np.uint8)).save(path)
    with pytest.raises(ImageTooLargeError, match="30 x 20 pixels, more than the limit of 599"):
        imageio.read_image(path, 8, max_pixels=599)
    assert imageio.read_image(path, 8, max_pixels=600).shape == (8, 8, 3)
    with pytest.raises(ImageTooLargeError, match="limit of 599"):
        imageio.read_mask(path, 8, 127, max_pixels=599)
    imageio.set_max_image_pixels(10**9)
    assert Image.MAX_IMAGE_PIXELS == pil_before  # PIL's process-wide limit untouched


# ---------------------------------------------------------------------------
# 2. Pickles: shared references are not a tree, nesting has a floor.


def shared_lists(levels: int) -> bytes:
    """``L_i = [L_{i-1}, L_{i-1}]`` through the memo: ~8 bytes a level, 2**levels as a tree."""
    out = [b"\x80\x02]q\x00"]
    for i in range(levels):
        out.append(b"(h" + bytes([i]) + b"h" + bytes([i]) + b"lq" + bytes([i + 1]))
    return b"".join(out) + b"."


def lists_filled_after_sharing(levels: int) -> bytes:
    """The same graph, but each list is shared while still empty and filled afterwards."""
    out = [b"\x80\x02"]
    for i in range(levels + 1):
        out.append(b"]q" + bytes([i]) + b"0")  # EMPTY_LIST, BINPUT i, POP
    for i in range(levels, 0, -1):
        out.append(b"h" + bytes([i]) + b"(h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"e0")
    return b"".join(out) + b"h" + bytes([levels]) + b"."


def _state_dict_holding(obj_pickle: bytes) -> bytes:
    """``{"w": <obj>}`` around a pickle body (its PROTO and STOP stripped)."""
    body = obj_pickle[2:-1]
    return b"\x80\x02}X\x01\x00\x00\x00w" + body + b"s."


@pytest.mark.parametrize("build", [shared_lists, lists_filled_after_sharing])
@pytest.mark.parametrize("wrap", [False, True])
def test_shared_references_are_refused_fast(tmp_path, build, wrap):
    pkl = build(40)
    if wrap:
        pkl = _state_dict_holding(pkl)
    assert len(pkl) < 700
    path = tmp_path / "w.pth"
    path.write_bytes(zip_checkpoint({}, {}, data_pkl=pkl))
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=r"w\.pth: .*expands to more than \d+ objects"):
        load_state_dict(path)
    assert time.monotonic() - start < 3


def test_shared_header_pickle_of_a_legacy_file_is_refused(tmp_path):
    # The protocol-version pickle is a 2**40 tree: printing it in an error took forever.
    blob = pickle.dumps(MAGIC, protocol=2) + shared_lists(40)
    path = tmp_path / "w.pth"
    path.write_bytes(blob)
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="expands to more than"):
        load_state_dict(path)
    assert time.monotonic() - start < 3


def test_shared_plain_data_stays_shared():
    obj = {"a": [1, 2], "b": None}
    obj["b"] = obj["a"]
    got = load_plain(io.BytesIO(pickle.dumps(obj, protocol=2)))
    assert got == {"a": [1, 2], "b": [1, 2]} and got["a"] is got["b"]


DEPTH = 100_000


def _deep(kind: str) -> bytes:
    if kind == "list":
        return b"\x80\x02" + b"]" * DEPTH + b"a" * (DEPTH - 1) + b"."
    if kind == "dict":
        return b"\x80\x02" + b"}K\x00" * DEPTH + b"}" + b"s" * DEPTH + b"."
    return b"\x80\x02}" + b")" + b"\x85" * (10 * DEPTH) + b"K\x01s."  # a 1e6-deep tuple key


@pytest.mark.parametrize("kind", ["list", "dict", "tuple_key"])
def test_deep_nesting_is_a_checkpoint_error(tmp_path, kind):
    path = tmp_path / "w.pth"
    path.write_bytes(zip_checkpoint({}, {}, data_pkl=_deep(kind)))
    # In a child process: the 1e6-deep tuple key crashed the interpreter (C stack).
    code = (
        "import sys\n"
        "from protorefine_jax.io.torch_checkpoint import load_state_dict\n"
        "from protorefine_jax.io.errors import CheckpointError\n"
        f"try:\n    load_state_dict({str(path)!r})\n"
        "except CheckpointError as e:\n    print('REFUSED', e)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "REFUSED" in run.stdout and "more than 100 levels deep" in run.stdout
    assert "RecursionError" not in run.stdout + run.stderr


def test_deep_plain_pickle_is_an_unpickling_error():
    with pytest.raises(pickle.UnpicklingError, match="more than 100 levels deep"):
        load_plain(io.BytesIO(_deep("list")))


# ---------------------------------------------------------------------------
# 3. CLIP folder config.json: every field used is typed and bounded.


def _tiny_config() -> dict:
    return {
        "projection_dim": 8,
        "text_config": {
            "vocab_size": 100,
            "hidden_size": 8,
            "intermediate_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 7,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-5,
        },
        "vision_config": {
            "image_size": 32,
            "patch_size": 16,
            "hidden_size": 8,
            "intermediate_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-5,
        },
    }


def _read(tmp_path: Path, text: str):
    (tmp_path / "config.json").write_text(text)
    return clip_folder.read_config(tmp_path)


def test_tiny_config_reads():
    spec = ClipSpec.from_hf_config(_tiny_config())
    assert spec.patch_size == 16 and spec.vocab_size == 100 and spec.embed_dim == 8


@pytest.mark.parametrize(
    ("where", "key", "value", "match"),
    [
        ("vision_config", "patch_size", 0, r"vision_config\.patch_size must be an integer in \[1"),
        ("vision_config", "patch_size", -16, r"vision_config\.patch_size must be an integer"),
        ("vision_config", "image_size", "32", r"vision_config\.image_size must be an integer"),
        ("vision_config", "hidden_size", 10**9, r"vision_config\.hidden_size must be an integer"),
        ("text_config", "hidden_size", 1e9, r"text_config\.hidden_size must be an integer"),
        ("text_config", "vocab_size", True, r"text_config\.vocab_size must be an integer"),
        ("text_config", "num_hidden_layers", 10**6, r"num_hidden_layers must be an integer"),
        ("text_config", "max_position_embeddings", -1, r"max_position_embeddings must be an"),
        (None, "projection_dim", [8], r"projection_dim must be an integer in \[1, 16384\]"),
        (None, "text_config", [1, 2], r"text_config must be a JSON object, got list"),
        ("text_config", "layer_norm_eps", "x", r"text_config\.layer_norm_eps must be a number"),
        ("vision_config", "hidden_act", ["gelu"], r"vision_config\.hidden_act must be one of"),
    ],
)
def test_bad_config_fields_are_one_line_errors(tmp_path, where, key, value, match):
    config = _tiny_config()
    (config if where is None else config[where])[key] = value
    with pytest.raises(CheckpointError, match=match) as err:
        _read(tmp_path, json.dumps(config))
    msg = str(err.value)
    assert "config.json" in msg and "Fix:" in msg and "\n" not in msg


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[1, 2, 3]", "must hold a JSON object, got list"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"a": ' * 100_000 + "1" + "}" * 100_000, "nested too deeply"),
        ("{not json", "Expecting property name"),
        ('"just a string"', "got str"),
    ],
)
def test_malformed_config_json_is_a_clear_error(tmp_path, text, match):
    with pytest.raises(CheckpointError, match=match) as err:
        _read(tmp_path, text)
    assert "\n" not in str(err.value)


def _mutate_config(rng: random.Random, config: dict) -> str:
    kind = rng.choice(["value", "value", "value", "drop", "text"])
    parts = [config, config.get("text_config"), config.get("vision_config")]
    parts = [p for p in parts if isinstance(p, dict) and p]
    if not parts:
        return json.dumps(config)
    part = rng.choice(parts)
    key = rng.choice(sorted(part))
    odd = [0, -1, 1, 3, 7, 2**31, 10**30, 1e9, 1.5, -0.0, float("nan"), "16", "", None, True]
    odd += [[], {}, [16], {"x": 1}, "gelu", "quick_gelu", "relu", 1e-5]
    if kind == "value":
        part[key] = rng.choice(odd)
    elif kind == "drop":
        del part[key]
    text = json.dumps(config)
    if kind == "text":
        i = rng.randrange(len(text))
        text = rng.choice([text[:i], text[:i] + rng.choice('[]{}",:0') + text[i + 1 :]])
    return text


def test_fuzzed_clip_configs_read_or_raise_checkpoint_error(tmp_path):
    rng = random.Random(2)
    start = time.monotonic()
    outcomes = {"read": 0, "refused": 0}
    for _ in range(400):
        config = _tiny_config()
        for _ in range(rng.randint(1, 3)):
            text = _mutate_config(rng, config)
            try:
                config = json.loads(text)
            except ValueError:
                break
            if not isinstance(config, dict):
                break
        try:
            _read(tmp_path, text)
            outcomes["read"] += 1
        except CheckpointError as e:
            assert "config.json" in str(e) and "\n" not in str(e)
            outcomes["refused"] += 1
    assert outcomes["read"] > 10 and outcomes["refused"] > 100, outcomes
    assert time.monotonic() - start < 60
