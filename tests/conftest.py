"""Shared test helpers: tiny random transformers models as the oracle."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# commands keep compiled programs in ~/.cache/llama3-jax/xla by default: not the tests (they must not
# share entries with the user's runs nor with each other); a test that wants a cache names its own
# directory (--compile-cache, or JAX_COMPILATION_CACHE_DIR, which comes first)
os.environ.setdefault("LLAMA3_JAX_COMPILE_CACHE", "none")

import pytest


def make_hf_llama(path=None, *, seed=0, vocab=211, dim=40, layers=2, heads=4, kv_heads=2, head_dim=10, ffn=72,
                  tie=False, scaling=True, max_pos=128, init_range=0.02, dtype=None):
    """A tiny random `LlamaForCausalLM` (float32), saved to `path` when given."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    rope = {"rope_type": "default", "rope_theta": 500000.0}
    if scaling:
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      rms_norm_eps=1e-5, max_position_embeddings=max_pos, rope_parameters=rope,
                      tie_word_embeddings=tie, initializer_range=init_range, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    if dtype is not None:
        model = model.to(dtype)
    if path is not None:
        model.save_pretrained(path)
    return model


@pytest.fixture
def hf_llama():
    return make_hf_llama
