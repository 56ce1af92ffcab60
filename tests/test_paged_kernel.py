"""The TPU ragged_paged_attention kernel behind the paged cache's switch (attention/ragged_paged.py).

jax 0.10.2's Pallas interpreters cannot run the kernel on CPU, so: the arguments our wrapper builds
(the stacked pool as one flat page array, layer l's pages at l N + page, kv_lens, cu_q_lens) go to the
kernel's own reference (`ref_ragged_paged_attention`, its contract) and must equal the XLA paged path;
the switch picks and refuses as documented; and, with libtpu installed, a whole paged decode step with
the kernel compiles for a TPU topology.
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama3_jax.model import attention as attn
from llama3_jax.model import paged_cache
from llama3_jax.model.attention import decode, ragged_paged


def pools(dtype, layers=3, n=15, g=8, kv=2, d=128, seed=0):
    """The same random K and V pages in both layouts: split (L, 2, N, G, KV, D), interleaved (L, N, G, 2 KV, D)."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    k, v = (jax.random.normal(key, (layers, n, g, kv, d)).astype(dtype) for key in (k1, k2))
    return jnp.stack([k, v], axis=1), paged_cache.interleave(k, v), k3


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_inputs_give_the_xla_paged_attention(dtype):
    """Every layer of a 3-layer pool, rows with pages scattered out of order, lengths ending mid-page,
    at a page end and on a page's first slot, GQA (4 query heads per kv head), a free slot at page 0."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ref_ragged_paged_attention

    split, pool, key = pools(dtype)
    b, h, d = 4, 8, 128
    q = jax.random.normal(key, (b, 1, h, d)).astype(dtype)
    table = jnp.asarray([[9, 2, 14, 5, 11, 0], [7, 0, 0, 0, 0, 0], [3, 12, 1, 8, 0, 0], [0] * 6], jnp.int32)
    positions = jnp.asarray([40, 7, 24, 0], jnp.int32)  # 41 keys; one full page; 25 (page 4's first slot); free
    for layer in range(pool.shape[0]):
        want = decode.attend_paged(q, split, layer, table=table, positions=positions)
        args = ragged_paged.kernel_inputs(q, pool, jnp.int32(layer), table, positions)
        got = ref_ragged_paged_attention(*args, sm_scale=d ** -0.5)[:, None]
        assert got.shape == want.shape
        tol = 1e-5 if dtype == jnp.float32 else 2e-2
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)
    # the wrong layer's pages give another answer: the offset is what selects the layer
    other = ref_ragged_paged_attention(*ragged_paged.kernel_inputs(q, pool, 0, table, positions), sm_scale=d ** -0.5)
    assert not np.allclose(np.asarray(other, np.float32), np.asarray(got[:, 0], np.float32), atol=1e-2)


def test_the_switch_picks_the_kernel_on_tpu_only_for_what_it_reads():
    f32, i8 = jnp.float32, jnp.int8
    assert attn.resolve_paged("auto", "tpu", jnp.bfloat16, 128) == "ragged_paged"
    assert attn.resolve_paged("auto", "tpu", i8, 128) == "blockwise"  # int8 cache: scales per position
    assert attn.resolve_paged("auto", "tpu", f32, 64) == "blockwise"  # head_dim not a multiple of 128
    assert attn.resolve_paged("auto", "cpu", f32, 128) == "blockwise"
    assert attn.resolve_paged("auto", "gpu", f32, 128) == "blockwise"
    assert attn.paged_backend("ragged_paged") is ragged_paged.attend
    assert attn.paged_backend("blockwise") is decode.attend_paged
    with pytest.raises(ValueError, match="ragged_paged is a TPU kernel; the devices here are cpu"):
        attn.resolve_paged("ragged_paged", "cpu", f32)
    with pytest.raises(ValueError, match="int8 KV cache needs paged_attention=blockwise"):
        attn.resolve_paged("ragged_paged", "tpu", i8)
    with pytest.raises(ValueError, match="paged_attention must be one of auto, blockwise, ragged_paged"):
        attn.resolve_paged("flash", "tpu", f32)
    _, pool, _ = pools(i8, layers=1, d=132)
    with pytest.raises(ValueError, match="kernel reads a float cache of head_dim 128; this pool is int8 of width 132"):
        ragged_paged.attend(jnp.zeros((1, 1, 4, 128)), pool, 0, table=jnp.zeros((1, 2), jnp.int32),
                            positions=jnp.zeros((1,), jnp.int32))


PAGED_TPU_STEP = r"""
import jax, jax.numpy as jnp
from flax import nnx
from llama3_jax.model.config import ModelConfig
from llama3_jax.model.llama import abstract_model
from llama3_jax.model.paged_cache import PagedKVCache
from llama3_jax.serve.slots import decode_step
from llama3_jax.train.dryrun import topology_devices

dev = topology_devices("v5e:2x2")[0]
one = jax.sharding.SingleDeviceSharding(dev)
cfg = ModelConfig(vocab_size=512, dim=1024, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=128,
                  intermediate_size=2048, max_seq_len=4096, dtype="bfloat16", param_dtype="bfloat16")
graphdef, params = nnx.split(abstract_model(cfg, paged_attention="ragged_paged"))
b, pages, page, width = 16, 256, 64, 32
cache = jax.eval_shape(lambda: PagedKVCache.init(cfg, pages, page, b, width, jnp.bfloat16, interleaved=True))
spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one)

def step(params, tok, pos, cache):
    return decode_step(nnx.merge(graphdef, params), tok, pos, cache)

args = jax.tree.map(spec, (params, jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32), cache))
with jax.default_device(dev):  # Mosaic asks the default device which chip it lowers for
    text = jax.jit(step).lower(*args).compile().as_text()
assert "ragged_paged_attention_kernel" in text, "the kernel is not in the compiled step"

# a 2 x 2 mesh (data, tensor): one kernel call per device (shard_map), rows and kv heads split
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from llama3_jax.model.paged_cache import INTERLEAVED_AXES
from llama3_jax.parallel.sharding import named_sharding
devs = topology_devices("v5e:2x2")
mesh = jax.sharding.Mesh(np.array(devs).reshape(2, 1, 2), ("data", "fsdp", "tensor"))
put = lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
rep = NamedSharding(mesh, P())
rows = named_sharding(mesh, ("batch",), (b,))
args = (jax.tree.map(lambda x: put(x, rep), params), put(args[1], rows), put(args[2], rows),
        type(cache)(kv=put(cache.kv, named_sharding(mesh, INTERLEAVED_AXES, cache.kv.shape)), table=put(cache.table, rep),
                    interleaved=True))
assert args[3].kv.sharding.spec[3] == "tensor"
with jax.set_mesh(mesh), jax.default_device(devs[0]):
    text = jax.jit(step).lower(*args).compile().as_text()
assert "ragged_paged_attention_kernel" in text, "the kernel is not in the compiled mesh step"
print("compiled")
"""


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (the `tpu` extra) is not installed")
def test_a_paged_decode_step_with_the_kernel_compiles_for_a_tpu_topology():
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.run([sys.executable, "-c", PAGED_TPU_STEP], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("compiled")


def test_both_pool_layouts_hold_the_same_pages():
    """`place` (prefilled rows into their pages) and `write` (a decode step's token) fill the split and
    the interleaved pool alike, and put each token at (table[r, t // G], t % G)."""
    from llama3_jax.model.config import ModelConfig
    from llama3_jax.model.kv_cache import KVCache

    cfg = ModelConfig(vocab_size=32, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, intermediate_size=64,
                      max_seq_len=64, dtype="float32")
    lengths, p, g = [16, 5, 11], 16, 8
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    k, v = (jax.random.normal(key, (2, 3, p, 2, 8)) for key in keys[:2])
    seg = jnp.asarray([[0] * (p - n) + [1] * n for n in lengths], jnp.int32)
    tmp = KVCache(k=k, v=v, segment_ids=seg, index=jnp.int32(p))
    table = jnp.asarray([[3, 1, 6], [2, 0, 0], [5, 4, 0]], jnp.int32)
    new_k, new_v = (jax.random.normal(key, (3, 1, 2, 8)) for key in keys[2:])
    pos = jnp.asarray(lengths, jnp.int32)
    out = {}
    for interleaved in (False, True):
        c = paged_cache.place(paged_cache.PagedKVCache.init(cfg, 8, g, 3, 3, jnp.float32, interleaved), tmp, table)
        out[interleaved] = paged_cache.write(c.kv, 1, new_k, new_v, table=table, positions=pos, interleaved=interleaved)
    split = out[False]
    np.testing.assert_array_equal(paged_cache.interleave(split[:, 0], split[:, 1]), out[True])
    for r, n in enumerate(lengths):
        for t in range(n):
            np.testing.assert_array_equal(split[:, 0, table[r, t // g], t % g], k[:, r, p - n + t])
            np.testing.assert_array_equal(split[:, 1, table[r, t // g], t % g], v[:, r, p - n + t])
        np.testing.assert_array_equal(split[1, 0, table[r, n // g], n % g], new_k[r, 0])
    assert not np.any(split[:, :, 7])  # a page no row holds stays empty
