r"""Command line: OpenCLIP checkpoint + BPE file -> local HF CLIP folder.

Example (the paper's model; nothing is downloaded, both files are local):

  python -m experiments.convert_openclip \
    --checkpoint open_clip_pytorch_model.bin \
    --bpe bpe_simple_vocab_16e6.txt.gz \
    --model ViT-B-16-plus-240 \
    --out checkpoints/clip/ViT-B-16-plus-240
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import app, flags

from protorefine_jax.io import clip_folder

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint",
    None,
    "OpenCLIP weights: .safetensors, .npz, or torch zip .bin/.pt.",
    required=True,
)
_BPE = flags.DEFINE_string("bpe", None, "bpe_simple_vocab_16e6.txt.gz", required=True)
_OUT = flags.DEFINE_string("out", None, "HF CLIP folder to write.", required=True)
_MODEL = flags.DEFINE_string(
    "model", "ViT-B-16-plus-240", "OpenCLIP model name to check against; '' infers shapes."
)
_ACT = flags.DEFINE_enum("act", "gelu", ["gelu", "quick_gelu"], "Activation when --model=''.")


def main(argv: Sequence[str]) -> None:
    """Runs the conversion and prints the folder written."""
    del argv
    try:
        out = clip_folder.convert_openclip(
            _CHECKPOINT.value,
            _BPE.value,
            _OUT.value,
            model_name=_MODEL.value or None,
            hidden_act=_ACT.value,
        )
    except (ValueError, FileNotFoundError, UnicodeDecodeError) as err:
        # Bad input (an unsafe or corrupt checkpoint included) gets its message, not a traceback.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
