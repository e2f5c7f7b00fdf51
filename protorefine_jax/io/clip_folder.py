"""File I/O for CLIP: load a local HF CLIP folder, convert OpenCLIP checkpoints.

This is the edge of the CLIP package: everything here reads or writes files;
nothing downloads. A *CLIP folder* is a Hugging Face CLIP model folder:

  config.json                       HF `CLIPConfig`
  model.safetensors                 weights, HF PyTorch layout (or
                                    model.safetensors.index.json + shards,
                                    flax_model.msgpack, pytorch_model.bin)
  vocab.json, merges.txt            CLIP BPE tokenizer
  preprocessor_config.json          optional: `image_mean` / `image_std` of the
                                    input normalisation (OpenAI CLIP values
                                    when absent); its resize / crop settings
                                    are not used (see `towers`)

`load_clip` reads it without torch (safetensors via `safetensors.numpy`,
`.bin` through the allow-listed unpickler of `io.torch_checkpoint`) and converts the
weights to the HF Flax param tree itself (`convert.hf_state_dict_to_flax`), so
no randomly initialised copy of the model is ever built.

The folder is untrusted data: shard names in `model.safetensors.index.json`
must be `.safetensors` files inside the folder (read with the safetensors
reader only, never the pickle one), and every `*_file` entry of
`tokenizer_config.json` must name a file inside the folder.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import pathlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import safetensors.numpy
from flax import serialization
from transformers import CLIPTokenizer

from protorefine_jax.clip import bpe, convert
from protorefine_jax.clip.spec import CLIP_MEAN, CLIP_STD, PRESETS, ClipSpec
from protorefine_jax.io import torch_checkpoint
from protorefine_jax.io.errors import CheckpointError
from protorefine_jax.io.paths import UnsafePathError, check_relative

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "flax_model.msgpack",
    "pytorch_model.bin",
)
TOKENIZER_FILES = ("vocab.json", "merges.txt")
CONVERT_COMMAND = (
    "python -m experiments.convert_openclip --checkpoint <open_clip weights: "
    ".safetensors | .bin | .pt | .npz> --bpe <bpe_simple_vocab_16e6.txt.gz> "
    "--model ViT-B-16-plus-240 --out {folder}"
)


class ClipBundle(NamedTuple):
    """A loaded CLIP model.

    Attributes:
      spec: architecture and input normalisation (static; selects the HF
        Flax module; `image_mean/std` from `preprocessor_config.json`).
      params: HF Flax param tree (`jax.Array` leaves) for `FlaxCLIPModule`.
      tokenizer: HF `CLIPTokenizer` built from the folder's vocab/merges.
    """

    spec: ClipSpec
    params: dict[str, Any]
    tokenizer: CLIPTokenizer


def missing_clip_files(folder: str | pathlib.Path) -> list[str]:
    """Names of the files a CLIP folder lacks (empty when it is complete)."""
    folder = pathlib.Path(folder)
    missing = [n for n in ("config.json",) + TOKENIZER_FILES if not (folder / n).is_file()]
    if not any((folder / n).is_file() for n in WEIGHT_FILES):
        missing.append("model.safetensors")
    return missing


def check_clip_folder(folder: str | pathlib.Path) -> None:
    """Raises `FileNotFoundError` naming what is missing and how to provide it."""
    missing = missing_clip_files(folder)
    if not missing:
        return
    where = "does not exist" if not pathlib.Path(folder).is_dir() else "is incomplete"
    raise FileNotFoundError(
        f"CLIP folder {folder} {where}: missing {', '.join(missing)}. Nothing is downloaded "
        "at run time. Put a Hugging Face CLIP folder there (config.json, model.safetensors, "
        "vocab.json, merges.txt; e.g. a local copy of openai/clip-vit-base-patch16), or build "
        "one for the paper's OpenCLIP ViT-B-16-plus-240 (laion400m_e31) from its weight file "
        "and the BPE file bpe_simple_vocab_16e6.txt.gz (inside the open_clip_torch wheel): "
        + CONVERT_COMMAND.format(folder=folder)
    )


def read_state_dict(path: str | pathlib.Path, kind: str | None = None) -> dict[str, np.ndarray]:
    """Reads a flat weight file into `{name: np.ndarray}` without torch.

    Delegates to the project's torch-free reader
    (`protorefine_jax.io.torch_checkpoint.load_state_dict`: safetensors, npz,
    torch zip and legacy pickles through an allow-listed unpickler). A training
    checkpoint's `state_dict` entry is unwrapped there; DDP `module.` prefixes
    are stripped here.

    Args:
      path: `.safetensors`, `.npz`, or a torch checkpoint (`.bin`, `.pt`, `.pth`).
      kind: force one format (see `torch_checkpoint.load_state_dict`).

    Returns:
      The state dict.

    Raises:
      FileNotFoundError: if `path` does not exist.
      CheckpointError: (a `ValueError`) if the file cannot be parsed.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file {path} does not exist.")
    sd = torch_checkpoint.load_state_dict(path, kind=kind)
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _read_hf_weights(folder: pathlib.Path, spec: ClipSpec) -> dict[str, Any]:
    if (folder / "model.safetensors").is_file():
        sd = read_state_dict(folder / "model.safetensors")
    elif (folder / "model.safetensors.index.json").is_file():
        sd = {}
        for shard in shard_files(folder):
            sd.update(read_state_dict(shard, kind="safetensors"))
    elif (folder / "flax_model.msgpack").is_file():
        path = folder / "flax_model.msgpack"
        try:
            tree = serialization.msgpack_restore(path.read_bytes())
            sd = convert.flax_to_hf_state_dict(tree)
        except Exception as e:  # msgpack raises many unrelated types on corrupt input
            raise CheckpointError(f"{path}: not a valid Flax msgpack file ({e})") from e
    else:
        sd = read_state_dict(folder / "pytorch_model.bin")
    return convert.hf_state_dict_to_flax(sd, spec)


INDEX_FILE = "model.safetensors.index.json"


def shard_files(folder: str | pathlib.Path) -> list[pathlib.Path]:
    """The safetensors shards named by the folder's `model.safetensors.index.json`.

    Raises:
      CheckpointError: the index is not valid JSON / lacks `weight_map`, or a
        shard name is not a `.safetensors` file inside the folder (absolute,
        `..`), naming the index and the entry.
    """
    folder = pathlib.Path(folder)
    index_path = folder / INDEX_FILE
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        names = set(index["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(
            f"{index_path}: not a safetensors index (needs a JSON object with a "
            f"'weight_map' of tensor name -> shard file): {e}"
        ) from e
    shards = []
    for name in sorted(names, key=str):
        try:
            check_relative(name, f"shard name in {index_path}")
        except UnsafePathError as e:
            raise CheckpointError(f"{e} Fix: list shard files of the folder only.") from e
        if not name.endswith(".safetensors"):
            raise CheckpointError(
                f"{index_path}: shard {name!r} is not a .safetensors file; an index may only "
                "name safetensors shards."
            )
        shards.append(folder / name)
    return shards


def check_tokenizer_config(folder: str | pathlib.Path) -> None:
    """Checks that `tokenizer_config.json` points at no file outside the folder.

    Hugging Face lets its `*_file` entries (e.g. `vocab_file`) override the
    folder's own files; an entry that is absolute or has `..` would read any
    file on disk.

    Raises:
      ValueError: the file is not valid JSON, or (`UnsafePathError`) an entry
        leaves the folder (named with the fix).
    """
    path = pathlib.Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}.")
    for key, value in config.items():
        if key.endswith("_file") and value is not None:
            try:
                check_relative(value, f"{path}: {key}")
            except UnsafePathError as e:
                raise UnsafePathError(
                    f"{e} Fix: delete the entry (the folder's own vocab.json / merges.txt "
                    "are used) or name a file inside the folder."
                ) from e


def load_tokenizer(folder: str | pathlib.Path) -> CLIPTokenizer:
    """HF `CLIPTokenizer` from the folder's `vocab.json` / `merges.txt` (offline).

    Raises:
      UnsafePathError: `tokenizer_config.json` names a file outside the folder.
    """
    check_tokenizer_config(folder)
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


PREPROCESSOR_FILE = "preprocessor_config.json"
MIN_STD = 1e-6


def _rgb_triple(value: Any, name: str, path: pathlib.Path) -> tuple[float, float, float]:
    values = [value] * 3 if isinstance(value, (int, float)) else list(value)
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3:
        raise ValueError(f"{path}: {name} must be a number or 3 numbers (RGB), got {value!r}.")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{path}: {name} must be finite, got {list(out)}.")
    return out  # type: ignore[return-value]


def read_normalization(
    folder: str | pathlib.Path,
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """`(image_mean, image_std)` from the folder's `preprocessor_config.json`.

    Keys missing from the file, or a missing file, fall back to OpenAI CLIP's
    `CLIP_MEAN` / `CLIP_STD`; `"do_normalize": false` means no normalisation
    (mean 0, std 1: pixels scaled to [0, 1] only). A single number applies to
    all three channels, as in Hugging Face's image processors.

    Raises:
      ValueError: the file is not valid JSON or holds malformed values.
    """
    path = pathlib.Path(folder) / PREPROCESSOR_FILE
    if not path.is_file():
        return CLIP_MEAN, CLIP_STD
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}.")
    if not config.get("do_normalize", True):
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    mean = _rgb_triple(config.get("image_mean", CLIP_MEAN), "image_mean", path)
    std = _rgb_triple(config.get("image_std", CLIP_STD), "image_std", path)
    if min(std) < MIN_STD:
        raise ValueError(
            f"{path}: image_std must be >= {MIN_STD:g} (pixels in [0, 1]; a smaller std "
            f"blows normalised pixels past float32), got {list(std)}."
        )
    return mean, std


CONFIG_MAX_BYTES = 1 << 20


def read_config(folder: str | pathlib.Path) -> ClipSpec:
    """The `ClipSpec` of the folder's `config.json`, every field used checked.

    Raises:
      CheckpointError: one line naming the file, the field and what is
        allowed (not JSON, not an object, nested too deeply, a size of the
        wrong type or out of range, a file over `CONFIG_MAX_BYTES`).
    """
    path = pathlib.Path(folder) / "config.json"
    fix = "Fix: use the config.json of a real CLIP model (save it again with transformers)"
    try:
        if path.stat().st_size > CONFIG_MAX_BYTES:
            raise ValueError(f"larger than {CONFIG_MAX_BYTES} bytes")
        config = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError(f"must hold a JSON object, got {type(config).__name__}")
        return ClipSpec.from_hf_config(config)
    except RecursionError as e:
        raise CheckpointError(f"{path}: nested too deeply to be a CLIP config. {fix}.") from e
    except (ValueError, TypeError) as e:
        msg = " ".join(str(e).split())
        raise CheckpointError(f"{path}: {msg}. {fix}, or repair this field.") from e


def load_clip(folder: str | pathlib.Path) -> ClipBundle:
    """Loads a local HF CLIP folder into a spec, Flax params and a tokenizer.

    Args:
      folder: HF CLIP folder (see module docstring).

    Returns:
      `ClipBundle(spec, params, tokenizer)`; params are float32 `jax.Array`s;
      `spec.image_mean/std` come from `preprocessor_config.json`
      (`read_normalization`), so the jitted towers normalise as the weights
      expect.

    Raises:
      FileNotFoundError: naming the missing files and how to provide them.
      CheckpointError: `config.json` is malformed (`read_config`).
      ValueError: if the weights do not match `config.json`, or
        `preprocessor_config.json` is malformed.
    """
    check_clip_folder(folder)
    folder = pathlib.Path(folder)
    spec = read_spec(folder)
    params = jax.tree.map(jax.numpy.asarray, _read_hf_weights(folder, spec))
    return ClipBundle(spec, params, load_tokenizer(folder))


def read_spec(folder: str | pathlib.Path) -> ClipSpec:
    """The folder's `ClipSpec` as `load_clip` builds it: `config.json` plus the normalisation."""
    spec = read_config(folder)
    mean, std = read_normalization(folder)
    return dataclasses.replace(spec, image_mean=mean, image_std=std)


def weight_files(folder: str | pathlib.Path) -> list[pathlib.Path]:
    """The files `load_clip` reads the weights from (the first kind of `WEIGHT_FILES` present).

    A sharded checkpoint is its index followed by its shards (`shard_files`).

    Raises:
      FileNotFoundError: the folder holds no weight file (`check_clip_folder`'s message).
    """
    folder = pathlib.Path(folder)
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            if name == INDEX_FILE:
                return [folder / name, *shard_files(folder)]
            return [folder / name]
    check_clip_folder(folder)
    raise FileNotFoundError(f"CLIP folder {folder} holds no weight file.")  # unreachable


def write_clip_folder(
    out_dir: str | pathlib.Path,
    hf_state_dict: Mapping[str, np.ndarray],
    spec: ClipSpec,
    bpe_text: str,
) -> pathlib.Path:
    """Writes a complete HF CLIP folder (config, safetensors, tokenizer files).

    Args:
      out_dir: folder to create or fill.
      hf_state_dict: HF PyTorch-layout weights matching `spec`.
      spec: architecture, written as `config.json`; its `image_mean/std` go to
        `preprocessor_config.json`.
      bpe_text: decoded CLIP BPE merges file, turned into `vocab.json` +
        `merges.txt`.

    Returns:
      The folder path.
    """
    convert.check_hf_state_dict(hf_state_dict, spec)
    files = bpe.tokenizer_files(bpe_text, context_length=spec.context_length)
    vocab_size = len(json.loads(files["vocab.json"]))
    if vocab_size != spec.vocab_size:
        raise ValueError(
            f"BPE file gives a vocabulary of {vocab_size} tokens but the weights have "
            f"{spec.vocab_size}: wrong BPE file?"
        )
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec.to_hf_config().to_json_file(str(out / "config.json"), use_diff=False)
    tensors = {k: np.array(v, dtype=np.float32, order="C") for k, v in hf_state_dict.items()}
    safetensors.numpy.save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": spec.image_size},
        "do_center_crop": True,
        "crop_size": {"height": spec.image_size, "width": spec.image_size},
        "do_normalize": True,
        "image_mean": list(spec.image_mean),
        "image_std": list(spec.image_std),
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return out


def read_bpe_text(path: str | pathlib.Path) -> str:
    """Reads a CLIP BPE merges file (`.txt.gz` or plain `.txt`)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"BPE file {path} does not exist; it is bpe_simple_vocab_16e6.txt.gz from the "
            "open_clip_torch wheel (open_clip/bpe_simple_vocab_16e6.txt.gz)."
        )
    raw = path.read_bytes()
    return (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8")


def convert_openclip(
    checkpoint: str | pathlib.Path,
    bpe_path: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    model_name: str | None = None,
    hidden_act: str = "gelu",
    head_width: int = 64,
) -> pathlib.Path:
    """Converts an OpenCLIP checkpoint + BPE file into a local HF CLIP folder.

    Args:
      checkpoint: OpenCLIP weights (`.safetensors`, `.npz`, `.bin`/`.pt` zip).
      bpe_path: `bpe_simple_vocab_16e6.txt.gz`.
      out_dir: HF CLIP folder to write.
      model_name: OpenCLIP model name in `PRESETS` (e.g.
        `"ViT-B-16-plus-240"`): the weights are checked against it and its
        activation is used. None infers the shapes from the weights.
      hidden_act: activation when `model_name` is None.
      head_width: attention head width when `model_name` is None (OpenCLIP: 64).

    Returns:
      The folder path.
    """
    sd = read_state_dict(checkpoint)
    if model_name is None:
        spec = convert.infer_openclip_spec(sd, hidden_act=hidden_act, head_width=head_width)
    else:
        if model_name not in PRESETS:
            raise ValueError(f"unknown model {model_name!r}; known: {sorted(PRESETS)}")
        spec = PRESETS[model_name]
        inferred = convert.infer_openclip_spec(sd, hidden_act=spec.hidden_act)
        if inferred != spec:
            raise ValueError(f"{checkpoint} does not hold a {model_name}: {inferred} != {spec}")
    hf_sd = convert.openclip_to_hf_state_dict(sd, spec)
    return write_clip_folder(out_dir, hf_sd, spec, read_bpe_text(bpe_path))
