"""vit-service: a from-scratch Vision Transformer, its exported artifact, inference and serving."""

__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)
