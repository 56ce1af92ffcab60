"""Converters between Hugging Face, Meta and llama3-jax checkpoints (see core.convert)."""

from .core import FORMATS, ConvertError, convert

__all__ = ["FORMATS", "ConvertError", "convert"]
