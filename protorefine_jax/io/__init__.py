"""File reading at the edge of the package: every untrusted file is parsed here.

- :mod:`protorefine_jax.io.torch_checkpoint`: torch zip / legacy checkpoints
  (through :class:`~protorefine_jax.io.safe_pickle.SafeUnpickler`, the only
  unpickler of the package), safetensors and ``.npz`` into ``{key: ndarray}``.
- :mod:`protorefine_jax.io.clip_folder`: Hugging Face CLIP folders (weights,
  safetensors shards, tokenizer files), OpenCLIP conversion.
- :mod:`protorefine_jax.io.model_dir`: model directories of `experiments.fit`
  (safetensors arrays, JSON manifest, allow-listed classes, SHA-256 checks).

Files are data, never code: no global outside an allow-list is resolved, every
size a file claims is checked against the file's own size before anything is
allocated, and every path read from a file must stay inside its folder.
Import the submodules explicitly; this package only exports the error type.
"""

from protorefine_jax.io.errors import CheckpointError

__all__ = ["CheckpointError"]
