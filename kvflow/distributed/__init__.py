"""Tensor parallelism (issue 20) and data-parallel scale-out."""
