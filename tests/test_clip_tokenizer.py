"""Offline tokenization: BPE vocab built like OpenAI CLIP, HF tokenizer vs a reference BPE."""

import gzip
import html
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import regex
from transformers.models.clip.tokenization_clip import bytes_to_unicode as hf_bytes_to_unicode

from protorefine_jax.clip import bpe, prompts
from protorefine_jax.clip.spec import ClipSpec
from protorefine_jax.io import clip_folder as loader

# A tiny merges file in the format of bpe_simple_vocab_16e6.txt (header line first).
TINY_MERGES = [
    "t h",
    "th e</w>",
    "o f</w>",
    "p h",
    "ph o",
    "pho t",
    "phot o</w>",
    "b o",
    "t t",
    "bo tt",
    "l e</w>",
    "bott le</w>",
    "d e",
    "de f",
    "a m",
    "w i",
    "wi th</w>",
]
MVTEC = (
    "bottle cable capsule carpet grid hazelnut leather metal_nut pill screw tile "
    "toothbrush transistor wood zipper"
).split()


class ReferenceBPE:
    """OpenAI CLIP's SimpleTokenizer algorithm, written out independently."""

    PATTERN = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )

    def __init__(self, merges):
        self.byte_encoder = hf_bytes_to_unicode()
        base = list(self.byte_encoder.values())
        tokens = base + [b + "</w>" for b in base] + ["".join(m.split()) for m in merges]
        tokens += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {t: i for i, t in enumerate(tokens)}
        self.ranks = {tuple(m.split()): i for i, m in enumerate(merges)}

    def bpe_word(self, token):
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = [(word[i], word[i + 1]) for i in range(len(word) - 1)]
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def encode(self, text, context_length):
        text = regex.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip().lower()
        eot = self.encoder["<|endoftext|>"]
        ids = [self.encoder["<|startoftext|>"]]
        for token in regex.findall(self.PATTERN, text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe_word(token))
        ids.append(eot)
        return ids + [eot] * (context_length - len(ids))


def write_tokenizer(folder, merges):
    text = "#version: 0.2\n" + "\n".join(merges) + "\n"
    gz = folder / "bpe.txt.gz"
    gz.write_bytes(gzip.compress(text.encode()))
    for name, content in bpe.tokenizer_files(loader.read_bpe_text(gz), 77).items():
        (folder / name).write_text(content, encoding="utf-8")
    return loader.load_tokenizer(folder)


def test_bytes_to_unicode_matches_hf():
    assert bpe.bytes_to_unicode() == hf_bytes_to_unicode()


def test_vocab_layout():
    merges = bpe.parse_merges("#version: 0.2\n" + "\n".join(TINY_MERGES))
    vocab = bpe.build_vocab(merges)
    assert len(vocab) == 512 + len(TINY_MERGES) + 2
    assert vocab["<|endoftext|>"] == len(vocab) - 1
    assert vocab["<|startoftext|>"] == len(vocab) - 2
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert vocab["th"] == 512 and vocab["with</w>"] == 512 + 16
    with pytest.raises(ValueError, match="line 3"):
        bpe.parse_merges("#version: 0.2\na b\na b c\n")


def test_hf_tokenizer_matches_reference_on_prompts(tmp_path):
    tok = write_tokenizer(tmp_path, TINY_MERGES)
    normal, anomalous = prompts.prompt_ensemble(prompts.object_name("metal_nut"))
    texts = normal + anomalous + ["A Photo of  the BOTTLE, with defect!", "it's 3 photos"]
    got = prompts.tokenize(tok, texts, 77)
    assert got.shape == (len(texts), 77) and got.dtype == np.int32
    ref = ReferenceBPE(TINY_MERGES)
    for row, text in zip(got, texts, strict=True):
        assert row.tolist() == ref.encode(text, 77), text


def test_prompt_ensemble_sizes():
    normal, anomalous = prompts.prompt_ensemble("bottle")
    assert len(prompts.TEMPLATES) == 21
    assert len(normal) == 7 * 21 and len(anomalous) == 4 * 21
    assert normal[0] == "a cropped photo of the bottle."
    assert anomalous[-1] == "a photo of a bottle with damage for anomaly detection."
    assert prompts.object_name("metal_nut") == "metal nut"


def test_class_text_features_average_raw_prompt_embeddings(tmp_path):
    """anomalib's WinCLIP: `torch.mean` of the raw `encode_text` rows, no normalisation.

    Reference: HF's own `FlaxCLIPModel.get_text_features` per prompt, averaged
    in float64 numpy; the category goes in raw (`metal_nut`), as anomalib passes it.
    """
    from transformers import FlaxCLIPModel

    tok = write_tokenizer(tmp_path, TINY_MERGES)
    spec = ClipSpec(
        image_size=32,
        patch_size=16,
        vision_width=16,
        vision_layers=1,
        vision_heads=2,
        vision_mlp=32,
        text_width=32,
        text_layers=1,
        text_heads=2,
        text_mlp=64,
        context_length=77,
        vocab_size=512 + len(TINY_MERGES) + 2,
        embed_dim=16,
    )
    from test_clip_towers import init_params

    params = init_params(spec)
    text = np.asarray(prompts.class_text_features(spec, params, tok, "metal_nut"), np.float64)
    normal, anomalous = prompts.prompt_ensemble("metal_nut")
    assert normal[0] == "a cropped photo of the metal_nut."  # raw category, as anomalib
    ids = prompts.tokenize(tok, normal + anomalous, 77)
    model = FlaxCLIPModel(spec.to_hf_config(), _do_init=False)
    emb = np.asarray(
        jax.jit(lambda i, p: model.get_text_features(i, params=p))(jnp.asarray(ids), params),
        np.float64,
    )
    raw = np.stack([emb[: len(normal)].mean(0), emb[len(normal) :].mean(0)])
    assert text.shape == (2, 16)
    np.testing.assert_allclose(text, raw, atol=1e-5 * np.abs(raw).max(), rtol=0)
    # The old recipe (normalise each prompt, average, renormalise) is measurably different:
    # the rows are not unit vectors and their directions differ too.
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    old = np.stack([unit[: len(normal)].mean(0), unit[len(normal) :].mean(0)])
    old /= np.linalg.norm(old, axis=1, keepdims=True)
    assert not np.allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-3)
    cos = np.sum(old * raw, axis=1) / np.linalg.norm(raw, axis=1)
    assert np.all(cos < 1 - 1e-6), cos


def _real_bpe():
    path = os.environ.get("PROTOREFINE_CLIP_BPE", "")
    if not path or not pathlib.Path(path).is_file():
        pytest.skip("set PROTOREFINE_CLIP_BPE to bpe_simple_vocab_16e6.txt.gz (open_clip_torch)")
    return path


def test_real_clip_bpe_file(tmp_path):
    path = _real_bpe()
    text = loader.read_bpe_text(path)
    files = bpe.tokenizer_files(text)
    vocab = json.loads(files["vocab.json"])
    assert len(vocab) == 49408 and vocab["<|endoftext|>"] == 49407
    for name, content in files.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
    tok = loader.load_tokenizer(tmp_path)
    assert prompts.tokenize(tok, ["a photo of a cat"], 77)[0, :7].tolist() == [
        49406, 320, 1125, 539, 320, 2368, 49407,
    ]  # fmt: skip
    merges = files["merges.txt"].split("\n")[1:-1]
    texts = [
        p for name in MVTEC for p in sum(prompts.prompt_ensemble(prompts.object_name(name)), [])
    ]
    got = prompts.tokenize(tok, texts, 77)
    ref = ReferenceBPE(merges)
    for row, t in zip(got, texts, strict=True):
        assert row.tolist() == ref.encode(t, 77), t
