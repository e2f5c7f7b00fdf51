"""The application layer: eval, fit and predict as importable functions, no flags.

- `deploy`: fit a model directory, open it, predict a folder (`fit_model`,
  `open_model`, `predict`); `schema`: the ranges of every setting and of
  `model.json`; `image_check`, `advice`: what a user is told before and after.
- `runner`: the evaluation loop (`Settings`, `run`); `methods`: the one method
  table; `batching`: a library detector in fixed-size, optionally sharded
  batches (`BatchedDetector`); `prefetch`: overlapped image reading.
- `report`, `html_report`, `overlays`, `predict_labels`: tables, pages and
  pictures of the results.

The command lines over it are `protorefine_jax.cli` (absl flags, one module
per tool); the library below it (`protorefine_jax.*`) never imports it.
"""
