"""The dry run's step-time estimate when the compiler gives none: a roofline over one step's FLOPs, HBM
bytes and interconnect bytes per chip, each at the chip's published peak, perfectly overlapped.

Why not the compiler's numbers alone: libtpu's cost model (`optimal_seconds`, libtpu 0.0.42.1 in
compile-only mode) comes back negative for Llama-sized programs, and XLA's cost analysis counts a while
loop's body once, whatever its trip count. The TPU compiler turns big sharded matmuls into such loops
(windowed einsums stepping around the ring of chips), so for Llama 3 8B on v5e:4x4 it counts about half
the layer FLOPs that run. So FLOPs and collective bytes are counted here from the model and the mesh,
as one would by hand, and HBM bytes come from the compiler (a floor: its loops are counted once too).

The result is a lower bound on the step time and so an upper bound on MFU: what a step whose matmuls,
memory traffic and collectives all overlap perfectly would reach. Not modelled: data-centre network
(DCN) links between slices (counted as ICI), kernel launch and pipeline bubbles, host offload traffic.
"""

from __future__ import annotations

import dataclasses

from ..model.config import ModelConfig
from ..parallel.hardware import HBM_BYTES_PER_S, ICI_BYTES_PER_S, PEAK_FLOPS, lookup

# the decoder-layer matmuls whose forward a remat policy runs again in the backward (model.remat_policy).
# A projection whose output only feeds the residual add (wo, the MLP's down projection) is never run
# again: its backward needs its input, not its output, and XLA drops the dead recompute. full recomputes
# the rest; offload keeps q/k/v and the attention output, so only the MLP's gate/up projections run
# again; dots keeps the weight matmuls' outputs but not attention's (batched dots)
_RECOMPUTE = {"none": (), "dots": ("attn",), "full": ("q", "kv", "gate_up", "attn"),
              "save_qkv_proj": ("gate_up", "attn"), "offload": ("gate_up",)}


@dataclasses.dataclass(frozen=True)
class Roofline:
    """Per-chip seconds of each bound and the step time (the largest: perfect overlap)."""
    flops: float          # executed FLOPs per step, all chips
    compute_s: float
    memory_s: float | None
    network_s: float | None

    @property
    def seconds(self) -> float:
        return max(t for t in (self.compute_s, self.memory_s, self.network_s) if t is not None)

    def bound(self) -> str:
        named = {"compute": self.compute_s, "HBM": self.memory_s, "interconnect": self.network_s}
        return max((t, n) for n, t in named.items() if t is not None)[1]


def executed_flops(mc: ModelConfig, remat: str, batch: int, seq_len: int, causal_skip: bool = True) -> float:
    """FLOPs one train step runs (all chips): forward 2, backward 4 per weight and token, the forward
    again for what the remat policy recomputes. Attention as run: kernels that skip masked blocks
    (splash, blockwise, cuDNN: `causal_skip`) do about half the square, the reference path all of it."""
    d, f, h, kv, hd = mc.dim, mc.intermediate_size, mc.n_heads, mc.n_kv_heads, mc.head_dim
    weights = {"q": d * h * hd, "kv": 2 * d * kv * hd, "o": h * hd * d, "gate_up": 2 * d * f, "down": d * f}
    again = _RECOMPUTE.get(remat, _RECOMPUTE["full"])
    per_layer = 6 * sum(weights.values()) + 2 * sum(w for name, w in weights.items() if name in again)
    head = 6 * mc.vocab_size * d  # the output layer (tied or not); the embedding lookup is a gather
    return float(batch * seq_len * (mc.n_layers * per_layer + head)) + attention_flops(mc, remat, batch, seq_len,
                                                                                      causal_skip)


def attention_flops(mc: ModelConfig, remat: str, batch: int, seq_len: int, causal_skip: bool = True) -> float:
    """The attention matmuls of one train step (all chips): scores and weighted sum, forward, backward
    (2x) and the forward again where the remat policy recomputes attention (`_RECOMPUTE`). Also what the
    dry run adds for a kernel the compiler's cost analysis cannot see (dryrun.cost_estimate)."""
    keys = (seq_len + 1) / 2 if causal_skip else seq_len  # causal: (T + 1) / 2 keys per query on average
    per_token = 2 * 2 * mc.n_heads * mc.head_dim * keys  # scores + weighted sum
    passes = 4 if "attn" in _RECOMPUTE.get(remat, _RECOMPUTE["full"]) else 3
    return float(batch * seq_len * mc.n_layers * per_token * passes)


def collective_bytes(mc: ModelConfig, remat: str, batch: int, seq_len: int, mesh: dict,
                     compute_bytes: int = 2, grad_bytes: int = 4) -> float:
    """Bytes one chip sends per step: FSDP gathers of the weights (compute dtype) in the forward, the
    backward and the recompute; the gradients' reduce-scatter over fsdp and all-reduce over data
    (parameter dtype); tensor-parallel gathers and reduce-scatters of the layer activations."""
    n_params = mc.num_params()
    fsdp = mesh.get("fsdp", 1) * mesh.get("dcn_fsdp", 1)
    data = mesh.get("data", 1) * mesh.get("dcn_data", 1)
    tensor = mesh.get("tensor", 1)
    per_chip_weights = n_params / tensor
    recompute = bool(_RECOMPUTE.get(remat, _RECOMPUTE["full"]))
    total = 0.0
    if fsdp > 1:
        ring = (fsdp - 1) / fsdp
        total += (3 if recompute else 2) * per_chip_weights * compute_bytes * ring
        total += per_chip_weights * grad_bytes * ring
    if data > 1:
        total += 2 * per_chip_weights / fsdp * grad_bytes * (data - 1) / data
    if tensor > 1:
        rows = batch / (data * fsdp)  # sequences per chip group
        act = rows * seq_len * mc.dim * compute_bytes * (tensor - 1) / tensor
        passes = 3 + (1 if recompute else 0)
        total += 4 * passes * mc.n_layers * act  # attention and MLP: a gather in, a reduce-scatter out
    return total


def estimate(mc: ModelConfig, remat: str, batch: int, seq_len: int, mesh: dict, device_kind: str,
             n_devices: int, compiler_flops: float, compiler_bytes: float | None,
             peak_per_chip: float | None = None, causal_skip: bool = True) -> Roofline | None:
    """The roofline for one step; None when the chip's peak FLOP/s is unknown. `compiler_flops` and
    `compiler_bytes` are per step per chip (the unrolled-layer extrapolation of dryrun.cost_estimate)."""
    peak = peak_per_chip or lookup(PEAK_FLOPS, device_kind)
    if not peak:
        return None
    flops = max(executed_flops(mc, remat, batch, seq_len, causal_skip), compiler_flops * n_devices)
    hbm = lookup(HBM_BYTES_PER_S, device_kind)
    ici = lookup(ICI_BYTES_PER_S, device_kind)
    memory_s = compiler_bytes / hbm if hbm and compiler_bytes else None
    network_s = collective_bytes(mc, remat, batch, seq_len, mesh) / ici if ici and n_devices > 1 else None
    return Roofline(flops=flops, compute_s=flops / n_devices / peak, memory_s=memory_s, network_s=network_s)
