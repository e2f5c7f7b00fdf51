"""File formats at the I/O edge: model directories (`model_dir`)."""
