"""Small stand-alone tools (benchmarks, fixtures); each runs with `python -m`."""
