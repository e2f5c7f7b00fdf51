"""Research scripts that reproduce a RESULTS.md section; eval, fit and predict never import them.

Each runs as before, from the repository root: `python -m
experiments.research.<name>` (the study behind RESULTS.md, the fusion and
calibration studies of the calibrated PatchCore+, the iteration and precision
checks). They import the library and the engine; the engine never imports them.
"""
