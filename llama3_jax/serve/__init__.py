"""Decoding: one engine, fed from a file (generate / score) and later from a queue or the RL rollout.

    engine.py        Generator: restore a checkpoint, the request API, scoring
    scheduler.py     continuous batching: admit, prefill, make room, decode, collect finished rows
    slots.py         the jitted device programs the scheduler calls (prefill, decode steps, cache moves)
    static_batch.py  the static-batching path (one batch to the end) kept as the reference
    sampling.py      per-row temperature / top-k / top-p draws
    offline.py       the JSONL jobs behind `llama3-jax generate` and `score`
"""
