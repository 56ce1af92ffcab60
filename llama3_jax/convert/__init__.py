"""Converters between Hugging Face, Meta and llama3-jax checkpoints and PEFT LoRA adapters (see core.convert).

Floors inside: tensors.py and atomic.py (the shared vocabulary and the atomic output directory) < the
formats (hf, meta, native, peft, untrusted) and stream.py < core.py, the driver that picks them, and
load.py, which reads an HF or Meta directory as if it were a checkpoint.
"""

from .core import FORMATS, ConvertError, convert

__all__ = ["FORMATS", "ConvertError", "convert"]
