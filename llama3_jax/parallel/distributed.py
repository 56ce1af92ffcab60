"""Process start-up across hosts: `jax.distributed` from config keys, CLI flags or the cluster itself.

A pod runs one JAX process per host, every one with the same command line; they must all call
`jax.distributed.initialize` before anything touches a JAX backend, or each would see only its own
devices. `initialize` does that when told explicitly (`distributed.*` keys for `train`, the
`--coordinator-address/--num-processes/--process-id` flags for the other commands) or when the
environment is a cluster JAX bootstraps by itself (Cloud TPU pod slices, SLURM, Open MPI, Kubernetes
JobSets). Anywhere else (a laptop, one GPU box) it does nothing: an unconditional
`jax.distributed.initialize()` would wait for a coordinator that never comes.

Failure is bounded: a process that dies stops sending heartbeats, and the coordination service makes
the others fail within `heartbeat_timeout` seconds instead of blocking forever in a collective.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from importlib.util import find_spec
from pathlib import Path

# set to 0 to skip the cluster auto-detection (e.g. independent --num-shards pods of one Indexed Job)
AUTO_ENV = "LLAMA3_JAX_AUTO_DISTRIBUTED"


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    coordinator_address: str | None = None  # HOST:PORT of process 0; None: one process, or the cluster's
    num_processes: int | None = None
    process_id: int | None = None
    initialization_timeout: int = 300  # seconds to wait for every process to join at start-up
    heartbeat_timeout: int = 60  # seconds of silence after which a process counts as dead and the others fail

    def __post_init__(self):
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"distributed.num_processes must be >= 1, got {self.num_processes}")
        if self.process_id is not None and self.process_id < 0:
            raise ValueError(f"distributed.process_id must be >= 0, got {self.process_id}")
        if None not in (self.num_processes, self.process_id) and self.process_id >= self.num_processes:
            raise ValueError(f"distributed.process_id {self.process_id} is not below "
                             f"distributed.num_processes {self.num_processes}")
        if self.coordinator_address is not None:
            host, _, port = str(self.coordinator_address).rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"distributed.coordinator_address must be HOST:PORT, got {self.coordinator_address!r}")
        for key in ("initialization_timeout", "heartbeat_timeout"):
            if getattr(self, key) < 1:
                raise ValueError(f"distributed.{key} must be >= 1 second, got {getattr(self, key)}")

    @property
    def explicit(self) -> bool:
        return any(v is not None for v in (self.coordinator_address, self.num_processes, self.process_id))


def _count(var: str) -> int:
    try:
        return int(os.environ.get(var, "1"))
    except ValueError:
        return 1


def detect_cluster() -> str | None:
    """The multi-process cluster this process runs in, as JAX would bootstrap it, else None.

    Only the environment is read (no metadata-server or API calls), and a one-process job counts as
    no cluster, so a plain run never waits for peers."""
    env = os.environ
    if env.get(AUTO_ENV, "1") == "0":
        return None
    if all(v in env for v in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                              "SLURM_LOCALID")) and _count("SLURM_NTASKS") > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and _count("OMPI_COMM_WORLD_SIZE") > 1:
        return "openmpi"
    if find_spec("libtpu") is not None:  # a Cloud TPU VM: a pod slice has more than one worker
        hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or ""
        if len([h for h in hosts.split(",") if h]) > 1:
            return "gke-tpu"
        if Path("/dev/accel0").exists() or Path("/dev/vfio").is_dir():
            # a GCE TPU VM: its worker list is in the metadata server, which JAX itself asks
            return "cloud-tpu"
    if "KUBERNETES_SERVICE_HOST" in env and "JOB_COMPLETION_INDEX" in env and find_spec("kubernetes"):
        return "kubernetes"  # an Indexed Job / JobSet pod; JAX reads its peers from the Kubernetes API
    return None


def initialize(cfg: DistributedConfig | None = None) -> bool:
    """Start `jax.distributed` when `cfg` asks for it or a cluster is detected; True if it runs.

    Call before any other JAX call. A second call (e.g. a test that started it itself) is a no-op."""
    import jax

    cfg = cfg or DistributedConfig()
    if jax.distributed.is_initialized():
        return True
    cluster = detect_cluster()
    if not cfg.explicit and cluster is None:
        return False
    missing = [k for k in ("coordinator_address", "num_processes", "process_id") if getattr(cfg, k) is None]
    if missing and cluster is None:
        raise ValueError(f"distributed: {', '.join(missing)} missing (give coordinator_address, num_processes "
                         f"and process_id together, or run where a cluster is detected)")
    try:
        jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id,
                                   initialization_timeout=cfg.initialization_timeout,
                                   heartbeat_timeout_seconds=cfg.heartbeat_timeout)
    except (RuntimeError, ValueError) as e:  # XlaRuntimeError is a RuntimeError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = f"coordinator {cfg.coordinator_address}" if cfg.coordinator_address else f"{cluster} cluster"
        raise ValueError(f"distributed: could not start with {where}: {first}") from None
    return True


def process_index() -> int:
    """This process's id, without starting a JAX backend when none is running (0 then)."""
    jax = sys.modules.get("jax")
    if jax is None or not jax.distributed.is_initialized():
        return 0
    return jax.process_index()


def process_count() -> int:
    """Processes in the job, without starting a JAX backend when none is running (1 then)."""
    jax = sys.modules.get("jax")
    if jax is None or not jax.distributed.is_initialized():
        return 1
    return jax.process_count()


def sync(name: str) -> None:
    """Every process waits here until all have reached the barrier `name` (several processes only).

    Why: some steps are done by process 0 alone on storage every process sees (clear or rename a temp
    directory, set corrupt checkpoint steps aside, download a workdir into the shared cache), and the
    others must not read or write there before it has finished. One place for the barrier, so every
    such step waits the same way. With one process there is nobody to wait for, and no JAX backend is
    started for it (process_count reads the running one only); `name` must be the same on every
    process and distinct from other barriers in flight."""
    if process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def is_main() -> bool:
    """Process 0 writes logs, progress bars and output files; the others stay quiet."""
    return process_index() == 0


def error_prefix() -> str:
    """"[process I] " when several processes run (each prints its own errors), else ""."""
    jax = sys.modules.get("jax")
    if jax is None or not jax.distributed.is_initialized() or jax.process_count() == 1:
        return ""
    return f"[process {jax.process_index()}] "
