"""Bytes on disk and in buckets: the one checkpoint format and what keeps it intact.

    checkpoint.py  the checkpoint directory (model config + orbax parameters), restore into a sharded target
    integrity.py   per-step manifests: a step with a missing or changed file is set aside
    remote.py      fsspec URLs (gs://, memory://): pull a source into a local cache, mirror a workdir
    paths.py       local-or-remote path helpers
    safe_paths.py  the one check on names we did not write (bucket keys, index and manifest entries)
    lock.py        one run at a time per workdir or output file (host, pid, start time; leases across hosts)
"""
