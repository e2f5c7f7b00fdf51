"""Issue 11, items 3, 4 and 6: paths from files and flags stay inside their folder.

Shard names and tokenizer `*_file` entries (from file contents), category
names (from a flag or a CSV), `--workdir` naming a file, non-UTF-8 file names
in results and TFDS preparation. Each test checks the error names the
problem and that nothing was written or read outside the folder.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from crafted import Evil

from protorefine_jax.app import runner
from protorefine_jax.data.errors import UnsafeNameError
from protorefine_jax.data.folder import load_category
from protorefine_jax.data.synthetic import make_synthetic_dataset
from protorefine_jax.io import clip_folder
from protorefine_jax.io.errors import CheckpointError
from protorefine_jax.io.paths import (
    UnsafePathError,
    check_output_dir,
    check_relative,
    json_safe_text,
    safe_filename,
)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize(
    "name, match",
    [
        ("../x", r"contains '\.\.'"),
        ("a/../../x", r"contains '\.\.'"),
        ("/etc/passwd", "absolute path"),
        ("C:\\x", "absolute path"),
        ("..\\x", r"contains '\.\.'"),
        ("", "not a file or folder name"),
        ("a\x00b", "control characters"),
    ],
)
def test_check_relative_refuses_escapes(name, match):
    with pytest.raises(UnsafePathError, match=match):
        check_relative(name, "entry")


def test_check_relative_accepts_names_inside():
    assert check_relative("shards/model-00001.safetensors", "shard") == (
        "shards/model-00001.safetensors"
    )
    with pytest.raises(UnsafePathError, match="not a single folder name"):
        check_relative("grp/odd", "Category", single=True)


def _write_index(folder: Path, shard: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    index = {"metadata": {}, "weight_map": {"w": shard}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors"])
def test_shard_names_cannot_leave_the_folder(tmp_path, shard):
    (tmp_path / "outside.safetensors").write_bytes(b"secret")
    folder = tmp_path / "clip"
    _write_index(folder, shard)
    with pytest.raises(CheckpointError, match=r"shard name in .*index\.json.*(absolute|\.\.)"):
        clip_folder._read_hf_weights(folder, None)


def test_shard_that_is_not_safetensors_never_reaches_the_pickle_reader(tmp_path):
    marker = tmp_path / "CODE_RAN"
    folder = tmp_path / "clip"
    _write_index(folder, "evil.bin")
    (folder / "evil.bin").write_bytes(pickle.dumps({"w": Evil(marker)}, protocol=2))
    with pytest.raises(CheckpointError, match=r"'evil\.bin' is not a \.safetensors file"):
        clip_folder._read_hf_weights(folder, None)
    # Even named .safetensors, a pickle is read by the safetensors reader only.
    (folder / "evil.safetensors").write_bytes((folder / "evil.bin").read_bytes())
    _write_index(folder, "evil.safetensors")
    with pytest.raises(CheckpointError, match=r"evil\.safetensors.*not a valid safetensors"):
        clip_folder._read_hf_weights(folder, None)
    assert not marker.exists()


def test_corrupt_index_is_a_clear_error(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a safetensors index"):
        clip_folder.shard_files(tmp_path)


@pytest.mark.parametrize("entry", ["/etc/hostname", "../vocab.json", "sub/../../v.json"])
def test_tokenizer_config_cannot_redirect_the_vocabulary(tmp_path, entry):
    folder = tmp_path / "clip"
    folder.mkdir()
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"vocab_file": entry}))
    with pytest.raises(UnsafePathError, match=r"tokenizer_config\.json: vocab_file"):
        clip_folder.load_tokenizer(folder)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    make_synthetic_dataset(root, ("fabric",), 2, 1, 1, image_size=32, seed=0)
    return root


@pytest.mark.parametrize("category", ["../fabric", "grp/odd", "/abs", "fabric/../fabric"])
def test_category_names_are_single_folders(tiny_dataset, category):
    with pytest.raises(UnsafeNameError, match="Category"):
        load_category(tiny_dataset, category)


@pytest.mark.parametrize("category", ["../ds_sibling", "grp/odd"])
def test_runner_refuses_unsafe_category_before_any_work(tmp_path, tiny_dataset, category):
    before = _tree(tiny_dataset)
    workdir = tmp_path / "run"
    s = runner.Settings(
        dataset="folder",
        data_dir=str(tiny_dataset),
        workdir=str(workdir),
        categories=(category,),
        weights="random",
        shots=(1,),
        seeds=(0,),
        methods=("patchcore",),
        progress=False,
    )
    with pytest.raises(UnsafeNameError, match="Category"):
        runner.run(s)
    assert _tree(tiny_dataset) == before  # nothing written into the dataset
    assert not list(workdir.glob("heatmaps/*"))
    # Nothing next to the workdir, and the refused run removed the workdir it created.
    assert os.listdir(tmp_path) == []


def test_workdir_naming_a_file_is_a_clear_error(tmp_path):
    f = tmp_path / "results.txt"
    f.write_text("x")
    with pytest.raises(FileExistsError, match="--workdir .*results.txt is an existing file"):
        runner.prepare_workdir(str(f), overwrite=True)
    assert check_output_dir(tmp_path / "new") == tmp_path / "new"


def test_safe_filename_and_json_names():
    bad = b"img\xff\xfe.png".decode("utf-8", "surrogateescape")
    text = json_safe_text(bad)
    assert text == "img\\xff\\xfe.png"
    json.loads(json.dumps(text, ensure_ascii=False).encode("utf-8"))  # strict UTF-8 JSON
    assert safe_filename("../../etc/x") == "_.._etc_x"
    assert "/" not in safe_filename("a/b\\c") and safe_filename("..") == "_"


def _non_utf8_dataset(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    make_synthetic_dataset(root, ("fabric",), 2, 1, 1, image_size=32, seed=0)
    good = root / "fabric" / "test" / "good"
    src = next(good.iterdir())
    dst = os.path.join(os.fsencode(good), b"bad\xff.png")
    os.rename(os.fsencode(src), dst)
    return root


def test_non_utf8_file_names_are_reported_as_valid_utf8(tmp_path):
    data = load_category(_non_utf8_dataset(tmp_path), "fabric", image_size=32)
    names = [data.name(t.path) for t in data.test]
    assert "test/good/bad\\xff.png" in names
    line = json.dumps({"files": names}, ensure_ascii=False)
    assert json.loads(line.encode("utf-8").decode("utf-8", "strict"))["files"] == names


def test_tfds_prepare_with_non_utf8_name_and_unsafe_category(tmp_path):
    tfds_builders = pytest.importorskip("protorefine_jax.data.tfds_builders")
    root = _non_utf8_dataset(tmp_path)
    out = tmp_path / "tfds"
    with pytest.raises(UnsafeNameError, match="Category"):
        tfds_builders.prepare_category("folder", root, "../fabric", out, image_size=32)
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))
    builder = tfds_builders.prepare_category("folder", root, "fabric", out, image_size=32)
    test = tfds_builders.read_split(builder, "test")
    assert "test/good/bad\\xff.png" in test["filename"].tolist()
    assert np.asarray(test["image"]).shape[1:] == (32, 32, 3)
