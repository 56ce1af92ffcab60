"""Decoding: one engine, fed from a file (generate / score), a queue (serve) or the RL rollout.

    engine.py        Generator: the public class (state, jitted programs, request API); shapes legend
    restore.py       the parameters it decodes with: restore, cast, quantise, split per layer
    caches.py        new KV caches (contiguous, paged) born sharded on the device
    request.py       Request, Completion, and how a row ends (stop token, budget, stop string)
    padding.py       left-padding prompts into fixed widths (whole batches, or one admission's rows)
    scheduler.py     continuous batching: admit, prefill, make room, decode, collect finished rows
    slots.py         the jitted device programs the scheduler calls (prefill, decode steps, cache moves)
    static_batch.py  the static-batching path (one batch to the end) kept as the reference
    sampling.py      per-row temperature / top-k / top-p draws, and the strategies that set them
    scoring.py       log-probs of given completions
    offline.py       the jobs behind `llama3-jax generate` and `score`
    jsonl.py         their JSONL plumbing: pieces of input, resume, durable appends, shards, progress
    openai/          `llama3-jax serve`: the OpenAI-compatible HTTP server over a live scheduler run
"""
