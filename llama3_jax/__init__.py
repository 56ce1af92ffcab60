"""llama3-jax: Meta's Llama 3 family in JAX / Flax NNX.

The common entry points are importable from the package (loaded on first use, so
`llama3-jax convert` does not pay for what it does not touch):

    from llama3_jax import Tokenizer, load_model, load_model_config, Generator
    from llama3_jax.convert import convert
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "ModelConfig": "model.config", "load_model_config": "model.config",
    "Tokenizer": "tokenizer",
    "load_model": "store.checkpoint", "restore_params": "store.checkpoint",
    "Llama": "model.llama",
    "Generator": "serve.engine",
    "make_mesh": "parallel.sharding",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'llama3_jax' has no attribute {name!r}")
