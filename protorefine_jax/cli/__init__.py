"""Command lines over `protorefine_jax.app`: `eval`, `fit`, `predict` (absl flags).

Run as `protorefine eval|fit|predict ...` (installed console script,
`protorefine_jax.cli.main`) or, from a checkout, `python -m experiments.eval`
(etc.). `flags/` holds the shipped flagfiles (one per dataset and shot count),
found by bare name (`--flagfile=mpdd_2shot.flags`).
"""
