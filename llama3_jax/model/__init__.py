"""The Llama 3 network and everything that describes it (the ground floor with `parallel/`).

    config.py       ModelConfig, the published presets, HF / Meta config translation
    llama.py        the NNX model: embeddings, the pure `decoder_layer`, the stack, the LM head
    rope.py         rotary tables (Llama 3.1 frequency scaling), float32 at full precision
    attention/      one switch over reference, blockwise, splash, cudnn, decode and ragged_paged
    lora.py         low-rank adapters as arguments of `decoder_layer` (not a copy of it)
    quant.py        int8 weights and int8 KV entries
    kv_cache.py     the contiguous decode cache the attention writes into
    paged_cache.py  the paged pool (pages shared by all rows) the attention writes into

Imports only go to `parallel/` (the one rules table) and to top-level helpers.
"""
