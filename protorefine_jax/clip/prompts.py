"""WinCLIP's compositional prompt ensemble and the per-class text embeddings.

State words x templates (Jeong et al. 2023, Sec. 4.1 and supplementary). The
lists below follow anomalib's WinCLIP reimplementation
(`anomalib/models/image/winclip/prompting.py`), the reference used in practice:
7 normal states, 4 anomalous states and 21 templates, 147 normal and 84
anomalous prompts per object. Unsure points, kept as anomalib has them so
results compare with anomalib's numbers: anomalib has no "broken {}" state
(other WinCLIP-style lists add it), and its template list holds "a jpeg
corrupted photo of the {}." twice where CLIP-style lists have one "of a {}."
and one "of the {}." variant. Other lists can be passed to `prompt_ensemble`.

`class_text_features` tokenizes with the HF tokenizer of the CLIP folder (pure
Python, offline), encodes with the jitted text tower and averages the RAW
(unnormalised) projected prompt embeddings per class, as anomalib's WinCLIP
does (`torch.mean` of `encode_text` outputs); the rows are normalised only
inside the cosine of `winclip.anomaly_probability`. (Normalising every prompt
before averaging, as CLIP's zero-shot ImageNet recipe does, weights prompts
equally instead of by their embedding norm; it is not what the reference does.)

Object names: anomalib passes the raw dataset category (`"metal_nut"`, not
`"metal nut"`) into the templates, and so does the eval host;
`object_name` gives the spaced variant for callers that want it.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from protorefine_jax.clip.spec import ClipSpec
from protorefine_jax.clip.towers import encode_text

NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)

ANOMALOUS_STATES = (
    "damaged {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)

TEMPLATES = (
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)


class Tokenizer(Protocol):
    """What `tokenize` needs: a Hugging Face tokenizer's `__call__`."""

    def __call__(self, text: list[str], **kwargs: Any) -> Any: ...  # noqa: D102


def object_name(category: str) -> str:
    """Spaced object words for a dataset category: `"metal_nut"` -> `"metal nut"`.

    Not used by the WinCLIP host, which passes the raw category as anomalib does.
    """
    return category.replace("_", " ").strip()


def prompt_ensemble(
    name: str,
    normal_states: tuple[str, ...] = NORMAL_STATES,
    anomalous_states: tuple[str, ...] = ANOMALOUS_STATES,
    templates: tuple[str, ...] = TEMPLATES,
) -> tuple[list[str], list[str]]:
    """Normal and anomalous prompts for one object (states x templates).

    Args:
      name: object name as it should read in a sentence (see `object_name`).
      normal_states: state phrases with one `{}` for the object.
      anomalous_states: same for the anomalous class.
      templates: sentence templates with one `{}` for the state phrase.

    Returns:
      `(normal, anomalous)` prompt lists, state-major (all templates of the
      first state first), as anomalib builds them.
    """
    normal = [t.format(s.format(name)) for s in normal_states for t in templates]
    anomalous = [t.format(s.format(name)) for s in anomalous_states for t in templates]
    return normal, anomalous


def tokenize(tokenizer: Tokenizer, prompts: list[str], context_length: int) -> np.ndarray:
    """Token ids `[P, context_length]` int32, padded after `<|endoftext|>`.

    Args:
      tokenizer: HF `CLIPTokenizer` (from `loader.load_tokenizer`).
      prompts: sentences.
      context_length: text positions of the model (77 for CLIP).

    Returns:
      `[P, context_length]` ids, each row `<|startoftext|> ... <|endoftext|> pad...`.
    """
    ids = tokenizer(
        list(prompts), padding="max_length", truncation=True, max_length=context_length
    )["input_ids"]
    return np.asarray(ids, np.int32)


@functools.partial(jax.jit, static_argnums=0)
def _class_means(spec: ClipSpec, params: Any, ids: Array, is_anomalous: Array) -> Array:
    emb = encode_text(spec, params, ids)  # [P, E], raw (not normalised), as anomalib
    weights = jnp.stack([1.0 - is_anomalous, is_anomalous]).astype(emb.dtype)  # [2, P]
    return (weights @ emb) / jnp.sum(weights, axis=1, keepdims=True)


def class_text_features(spec: ClipSpec, params: Any, tokenizer: Tokenizer, name: str) -> Array:
    """Normal and anomalous text embeddings of one object (WinCLIP's ensemble).

    Args:
      spec: CLIP architecture.
      params: HF Flax CLIP params.
      tokenizer: HF `CLIPTokenizer` of the same folder.
      name: object name as it goes into the prompts; anomalib's WinCLIP (and
        the eval host) pass the raw dataset category, e.g. `"metal_nut"`.

    Returns:
      `[2, E]` raw mean prompt embeddings (NOT unit rows; the cosine in
      `winclip.anomaly_probability` normalises them): row 0 normal, row 1
      anomalous.
    """
    normal, anomalous = prompt_ensemble(name)
    ids = tokenize(tokenizer, normal + anomalous, spec.context_length)
    # Causal attention + pooling at the first <|endoftext|>: trailing padding
    # changes nothing, so drop it (rounded up to 16 positions to share compiles).
    used = int(np.max(np.argmax(ids == spec.eos_token_id, axis=1))) + 1
    ids = ids[:, : min(spec.context_length, -(-used // 16) * 16)]
    flags = np.array([0.0] * len(normal) + [1.0] * len(anomalous), np.float32)
    return _class_means(spec, params, jnp.asarray(ids), jnp.asarray(flags))
