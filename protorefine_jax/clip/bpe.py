"""CLIP's byte-level BPE vocabulary, built the way OpenAI / OpenCLIP build it.

OpenAI CLIP ships only a merges list (`bpe_simple_vocab_16e6.txt.gz`, also
inside the PyPI package `open_clip_torch` as `open_clip/bpe_simple_vocab_16e6.txt.gz`).
The vocabulary is derived from it: the 256 byte symbols of
`bytes_to_unicode`, the same with `</w>` appended, one entry per merge (the
pair joined), then `<|startoftext|>` and `<|endoftext|>`. For the standard file
that is 256 + 256 + 48894 + 2 = 49408 entries. Hugging Face's `CLIPTokenizer`
reads the result as `vocab.json` + `merges.txt`.

Pure functions over strings; reading the `.gz` file lives in `protorefine_jax.io.clip_folder`.
"""

from __future__ import annotations

import functools
import json

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
CLIP_NUM_MERGES = 49152 - 256 - 2
"""Merges CLIP uses from the 16e6 file (OpenAI's `merges[1:49152-256-2+1]`)."""


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the rest map to code points
    from 256 on, in byte order.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, [chr(c) for c in chars], strict=True))


def parse_merges(bpe_text: str, max_merges: int = CLIP_NUM_MERGES) -> list[tuple[str, str]]:
    """Parses the merges of a CLIP BPE file (first line is a header, skipped).

    Args:
      bpe_text: decoded contents of `bpe_simple_vocab_16e6.txt(.gz)`.
      max_merges: how many merges to keep (CLIP: 48894; smaller files keep all).

    Returns:
      Merge pairs in rank order.

    Raises:
      ValueError: if a merge line does not hold exactly two symbols.
    """
    lines = bpe_text.split("\n")[1 : max_merges + 1]
    merges = []
    for number, line in enumerate(lines, start=2):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"BPE merges line {number} is not a pair of symbols: {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP vocabulary (token -> id) derived from its merges.

    Args:
      merges: merge pairs in rank order (see `parse_merges`).

    Returns:
      `{token: id}` with `len == 512 + len(merges) + 2`; `<|endoftext|>` has the
      largest id.
    """
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):  # ids would no longer be dense
        raise ValueError("BPE merges produce duplicate vocabulary entries; not a CLIP BPE file.")
    return vocab


def tokenizer_files(bpe_text: str, context_length: int = 77) -> dict[str, str]:
    """Contents of the HF tokenizer files for a CLIP BPE merges file.

    Args:
      bpe_text: decoded contents of `bpe_simple_vocab_16e6.txt(.gz)`.
      context_length: tokenizer `model_max_length`.

    Returns:
      `{filename: text}` for `vocab.json`, `merges.txt`, `tokenizer_config.json`
      and `special_tokens_map.json`.
    """
    merges = parse_merges(bpe_text)
    vocab = build_vocab(merges)
    special = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
    }
    config = dict(special, model_max_length=context_length, tokenizer_class="CLIPTokenizer")
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2),
        "special_tokens_map.json": json.dumps(special, indent=2),
    }
