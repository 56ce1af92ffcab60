"""Meshes and processes: the one logical-axis rules table and the multi-host plumbing.

    sharding.py      the mesh factory and RULES: no other file names a mesh axis
    distributed.py   jax.distributed start-up, process roles, bounded-time barriers
    multihost_io.py  broadcasting host data (requests, file pieces) from process 0
    hardware.py      device kinds and their peak FLOP/s and bandwidth

Nothing here imports another llama3_jax package: everything else stands on it.
"""
