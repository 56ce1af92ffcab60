"""`llama3-jax train ... --dry-run [--topology NAME [--num-slices N]]`: compile one real train step for
the configured mesh and report its memory and cost, allocating nothing.

The step is the one `train` runs (train/step.py `build`: the same shardings, attention backend, loss
chunking, remat and donation), lowered from abstract shapes (`jax.jit(...).lower(...).compile()`). On
the local devices, or, with `--topology v5e:4x4` / `v5p:8x8x8` / `v6e:16x16` (`--num-slices 2` for a
multislice job), for TPU chips that need not exist: libtpu's compile-only mode
(`jax.experimental.topologies.get_topology_desc`) compiles for the real chips on a CPU-only machine,
so a pod configuration's fit (out of memory or not) is known from a laptop.

Output: human-readable lines, then as the LAST line one JSON object: topology, devices,
bytes_per_device {arguments, temporaries, outputs, peak}, device_memory_bytes, fits, flops_per_step,
estimated_step_seconds, estimated_mfu. Exit status (cli/train.py): 0 fits, 3 does not fit, 2 config error.
`peak` = arguments + temporaries + outputs - aliased (the donated state is updated in place). The
compiler's cost model gives FLOPs (incl. rematerialised work) and, on TPU, an optimal step time
(`optimal_seconds`; see `cost_estimate` for how loops and kernels are counted). Where it gives none (libtpu
0.0.42.1 returns a negative time for Llama-sized programs), the step time is train/roofline.py's bound:
FLOPs, HBM bytes and interconnect bytes per chip at the chip's peaks, perfectly overlapped (a lower bound
on the time). The MFU estimate divides the model FLOPs (6 N + attention, as the train metrics count them)
by that time and the chips' dense bf16 peak: an estimate, not a measurement. The JSON's extra key
`estimate` says which one it is ("libtpu cost model" or "roofline").
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time

import jax
import jax.numpy as jnp

from ..data import BATCH_KEYS
from ..model import attention
from ..parallel.hardware import HBM_BYTES, PEAK_FLOPS, GiB, lookup
from ..parallel.sharding import logical_spec, make_mesh
from .config import TrainConfig, model_config, resolve_lora
from .metrics import model_flops_per_token, peak_flops
from . import roofline
from .step import build



class DoesNotFit(Exception):
    """The compiled step needs more memory per device than the chip has (exit status 3)."""


def topology_devices(name: str, num_slices: int = 1) -> list:
    """Compile-only TPU devices for a topology name such as "v5e:4x4" (needs libtpu, the `tpu` extra)."""
    from jax.experimental import topologies
    try:
        kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
        return list(topologies.get_topology_desc(name, "tpu", **kwargs).devices)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "not installed" in first:
            raise ValueError(f"--topology {name}: needs libtpu (pip install 'llama3-jax[tpu]')") from None
        raise ValueError(f"--topology {name}: {first}") from None


def device_memory_bytes(devices) -> int:
    """HBM of one device; CPU: the host's memory shared by its local devices."""
    d = devices[0]
    if d.platform == "cpu":
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total // max(1, sum(1 for x in devices if x.process_index == d.process_index))
    try:
        limit = (d.memory_stats() or {}).get("bytes_limit")
        if limit:
            return int(limit)
    except Exception:  # noqa: BLE001 - compile-only devices have no runtime stats
        pass
    return lookup(HBM_BYTES, d.device_kind) or 0


def compile_step(cfg: TrainConfig, devices, mc=None):
    """(compiled train step, model config, mesh) for `cfg` on `devices`, from abstract shapes only."""
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices, dcn_data=cfg.mesh.dcn_data,
                     dcn_fsdp=cfg.mesh.dcn_fsdp)
    mc = mc or model_config(cfg)
    setup = build(cfg, mc, mesh)
    batch_sh = jax.sharding.NamedSharding(mesh, logical_spec(("batch", "seq"), None, mesh))
    batch = {k: jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.int32, sharding=batch_sh)
             for k in BATCH_KEYS}
    with jax.set_mesh(mesh):
        compiled = setup.step_jit.lower(setup.abstract, batch, setup.frozen_abstract).compile()
    return compiled, mc, mesh


def cost_estimate(cfg: TrainConfig, mc, devices) -> tuple[float, float | None, float | None]:
    """(FLOPs per device, cost-model seconds or None, HBM bytes accessed per device or None) of one step.

    XLA's cost analysis counts a loop body once, whatever its trip count, and a custom call (the
    splash kernel) not at all. So the figures come from two extra compiles with the layers unrolled
    (1 and 2 layers, one microbatch, the loss in one piece; total = c1 + (layers - 1) * (c2 - c1),
    times `grad_accum`), plus the attention the compiler cannot see (the splash/cuDNN kernel, or the
    blockwise loops): roofline.attention_flops, the one count of it (the forward again only where the
    remat policy recomputes attention), at the chip's peak FLOP/s. None when those compiles do not fit
    either."""
    flat = dataclasses.replace(cfg, scan_layers=False, loss_chunk=0, grad_accum=1,
                               batch_size=cfg.batch_size // cfg.grad_accum)
    costs = []
    for n in (1, 2):
        try:
            cost = compile_step(flat, devices, dataclasses.replace(mc, n_layers=n))[0].cost_analysis() or {}
        except jax.errors.JaxRuntimeError:
            return model_flops_per_token(mc, cfg.seq_len) * cfg.batch_size * cfg.seq_len / len(devices), None, None
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        costs.append((float(cost.get("flops", 0.0)), float(cost.get("optimal_seconds", -1.0)),
                      float(cost.get("bytes accessed", 0.0))))
    (f1, s1, b1), (f2, s2, b2) = costs
    flops = (f1 + (mc.n_layers - 1) * (f2 - f1)) * cfg.grad_accum
    seconds = (s1 + (mc.n_layers - 1) * (s2 - s1)) * cfg.grad_accum if min(s1, s2) > 0 else None
    hbm = (b1 + (mc.n_layers - 1) * (b2 - b1)) * cfg.grad_accum if min(b1, b2) > 0 else None
    backend = attention.resolve(cfg.attention, devices[0].platform, cfg.seq_len)
    if backend != "reference":
        unseen = roofline.attention_flops(mc, cfg.remat, cfg.batch_size, cfg.seq_len) / len(devices)
        flops += unseen
        peak = lookup(PEAK_FLOPS, devices[0].device_kind)
        seconds = seconds + unseen / peak if seconds is not None and peak else None
    return flops, seconds, hbm


def host_line(mem) -> str:
    """", host memory: temporaries X" where the compiler placed buffers in host memory (remat=offload)."""
    host = int(getattr(mem, "host_temp_size_in_bytes", 0) or 0)
    return f"; host memory: temporaries {host / GiB:.2f} GiB (offloaded activations)" if host else ""


def dry_run(cfg: TrainConfig, topology: str | None = None, num_slices: int = 1, out=None) -> dict:
    """Compile, print the report (last line JSON) and return it; raises DoesNotFit when it does not fit."""
    out = out or sys.stdout
    cfg = resolve_lora(cfg)  # lora.init_from: its base's shape and the adapters' rank
    devices, name = _target_devices(topology, num_slices)
    n = len(devices)
    hbm = device_memory_bytes(devices)
    started = time.perf_counter()
    compiled, mc, mesh = _compile_or_report_oom(cfg, devices, name, hbm, out)
    mem = compiled.memory_analysis()
    per_device = _bytes_per_device(mem)
    fits = bool(hbm) and per_device["peak"] <= hbm
    # the memory lines first: the cost compiles below can take as long again on a big topology
    print(f"dry run: {mc.num_params():,} params, {name} ({devices[0].device_kind}), mesh {dict(mesh.shape)}, "
          f"{cfg.batch_size}x{cfg.seq_len} tokens, attention={cfg.attention}, remat={cfg.remat}, "
          f"compiled in {time.perf_counter() - started:.0f} s", file=out)
    print(f"per device: arguments {_gib(per_device['arguments'])}, temporaries {_gib(per_device['temporaries'])}, "
          f"outputs {_gib(per_device['outputs'])}, peak {_gib(per_device['peak'])} of {_gib(hbm)}"
          f"{host_line(mem)}", file=out, flush=True)
    model_flops = model_flops_per_token(mc, cfg.seq_len) * cfg.batch_size * cfg.seq_len
    flops, seconds, source = _step_time(cfg, mc, mesh, devices, model_flops, out)
    peak = peak_flops(cfg.peak_flops, devices) if devices[0].platform != "cpu" or cfg.peak_flops else float("nan")
    mfu = model_flops / (seconds * peak) if seconds and math.isfinite(peak) else None
    report = {"topology": name, "devices": n, "bytes_per_device": per_device, "device_memory_bytes": hbm,
              "fits": fits, "flops_per_step": flops, "estimated_step_seconds": seconds, "estimated_mfu": mfu,
              "estimate": source}
    if mfu is not None:
        print(f"estimate ({source}): step {seconds:.3f} s, MFU {mfu:.1%} "
              f"({cfg.batch_size * cfg.seq_len / seconds / n:,.0f} tokens/s/chip)", file=out)
    print(json.dumps(report), file=out, flush=True)
    if not fits:
        raise DoesNotFit(f"needs {_gib(per_device['peak'])} per device, the device has {_gib(hbm)}"
                         if hbm else "the device's memory size is unknown")
    return report


def _gib(b) -> str:
    return f"{b / GiB:.2f} GiB"


def _target_devices(topology: str | None, num_slices: int) -> tuple[list, str]:
    """(devices to compile for, their name in the report): a compile-only TPU topology, else the local
    devices ("cpu:8")."""
    if num_slices < 1:
        raise ValueError(f"--num-slices must be >= 1, got {num_slices}")
    if num_slices > 1 and topology is None:
        raise ValueError("--num-slices needs --topology")
    if topology:
        return topology_devices(topology, num_slices), topology + (f" x{num_slices}" if num_slices > 1 else "")
    devices = jax.devices()
    return devices, f"{devices[0].platform}:{len(devices)}"


def _compile_or_report_oom(cfg: TrainConfig, devices, name: str, hbm: int, out):
    """compile_step, or, when the compiler itself runs out of memory, the does-not-fit report (its
    temporaries from the error message) printed and DoesNotFit raised."""
    try:
        return compile_step(cfg, devices)
    except jax.errors.JaxRuntimeError as e:
        # the TPU compiler refuses a program whose temporaries exceed HBM: that is the answer too
        first = str(e).strip().splitlines()[0]
        if "RESOURCE_EXHAUSTED" not in first:
            raise
        found = re.search(r"temporaries \(([\d.]+)([KMGT])\)", first)
        temp = int(float(found.group(1)) * 1024 ** " KMGT".index(found.group(2))) if found else None
        report = {"topology": name, "devices": len(devices), "bytes_per_device": {"arguments": None,
                  "temporaries": temp, "outputs": None, "peak": None}, "device_memory_bytes": hbm, "fits": False,
                  "flops_per_step": None, "estimated_step_seconds": None, "estimated_mfu": None}
        print(f"dry run: {name}: the compiler ran out of memory: {first}", file=out)
        print(json.dumps(report), file=out, flush=True)
        raise DoesNotFit(first.split(":", 1)[-1].strip()) from None


def _bytes_per_device(mem) -> dict[str, int]:
    """The compiled step's memory analysis -> {arguments, temporaries, outputs, peak} bytes; the donated
    state is updated in place, so the aliased bytes count once."""
    per_device = {"arguments": int(mem.argument_size_in_bytes), "temporaries": int(mem.temp_size_in_bytes),
                  "outputs": int(mem.output_size_in_bytes)}
    per_device["peak"] = sum(per_device.values()) - int(mem.alias_size_in_bytes)
    return per_device


def _step_time(cfg: TrainConfig, mc, mesh, devices, model_flops: float, out) -> tuple[float, float | None, str | None]:
    """(FLOPs per step, estimated step seconds or None, which estimate: "libtpu cost model", "roofline"
    or None), printing the compiler's line (beside the `model_flops` the MFU counts) and the roofline's."""
    n = len(devices)
    started = time.perf_counter()
    per_device_flops, seconds, hbm_bytes = cost_estimate(cfg, mc, devices)
    flops = per_device_flops * n
    cost_s = time.perf_counter() - started
    print(f"compiler: {flops:.3e} FLOPs per step (model: {model_flops:.3e}), cost-model step "
          f"{'n/a' if seconds is None else f'{seconds:.3f} s'} (cost compiles: {cost_s:.0f} s)", file=out)
    if seconds is not None:
        return flops, seconds, "libtpu cost model"
    # no usable cost-model time: the roofline bound, when the chip's peaks are known
    roof = roofline.estimate(mc, cfg.remat, cfg.batch_size, cfg.seq_len, dict(mesh.shape),
                             devices[0].device_kind, n, per_device_flops, hbm_bytes, cfg.peak_flops or None,
                             attention.resolve(cfg.attention, devices[0].platform, cfg.seq_len) != "reference")
    if roof is None:
        return flops, None, None
    hbm_s = "n/a" if roof.memory_s is None else f"{roof.memory_s:.3f} s"
    net_s = "n/a" if roof.network_s is None else f"{roof.network_s:.3f} s"
    print(f"roofline: {roof.flops:.3e} FLOPs run per step -> compute {roof.compute_s:.3f} s, HBM {hbm_s}, "
          f"interconnect {net_s} per chip; {roof.bound()}-bound, perfectly overlapped: step >= "
          f"{roof.seconds:.3f} s", file=out)
    return roof.flops, roof.seconds, "roofline"
