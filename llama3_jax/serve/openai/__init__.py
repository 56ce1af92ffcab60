"""`llama3-jax serve`: the OpenAI-compatible HTTP server over the continuous-batching engine.

    requests.py   a request body -> checked engine requests; APIError, OpenAI's error shape
    responses.py  response bodies and stream chunks
    worker.py     the engine thread: jobs fed into one live scheduler run, deltas and log-probs back
    metrics.py    Prometheus text
    server.py     the HTTP app (FastAPI on uvicorn): routes, keys, limits, streaming, start-up, SIGTERM

    batch.py      OpenAI batch files through `generate`: the same bodies, written as Batch API lines

requests.py and responses.py import no web framework: batch.py (`generate`) uses them too.
"""
