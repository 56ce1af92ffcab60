"""Meta <-> jax/hf conversion, checked against Meta's own reference model and against transformers.

Oracles: `llama_models.llama3.model.Transformer` (Meta's code, on fairscale, run as a one-process model
parallel group on CPU), `transformers.LlamaForCausalLM`, fairscale's vocabulary split and llama_models'
own shard merge (`reshard_mp`). Checkpoints are tiny random float32/bfloat16 models written here.
"""

import dataclasses
import json
import socket

import ml_dtypes
import numpy as np
import pytest
import torch

from llama3_jax.store import checkpoint
from llama3_jax import cli
from llama3_jax.convert import ConvertError, convert
from llama3_jax.convert.meta import MetaReader

D, L, H, KV, V, MULTIPLE_OF = 64, 2, 4, 2, 256, 32
K = D // H
T = 48  # long enough that the smooth / scaled rope bands turn by a measurable angle


# ------------------------------------------------------------------------------------------ helpers


def meta_params(scaled=False, **extra):
    return dict(dim=D, n_layers=L, n_heads=H, n_kv_heads=KV, vocab_size=V, multiple_of=MULTIPLE_OF,
                ffn_dim_multiplier=None, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=scaled) | extra


def meta_ffn(params):
    """FFN width by Meta's own FeedForward rule (needs the model-parallel group)."""
    from llama_models.llama3.model import FeedForward
    ff = FeedForward(params["dim"], 4 * params["dim"], params["multiple_of"], params["ffn_dim_multiplier"])
    return ff.w1.weight.shape[0]


def random_meta(seed=0, dtype=torch.float32, tied=False):
    """A random Meta state dict (one shard), scaled so attention is far from uniform."""
    g = torch.Generator().manual_seed(seed)
    F = 192  # what Meta's rule gives for dim 64, multiple_of 32

    def r(*shape, std=0.1, mean=0.0):
        return (mean + std * torch.randn(*shape, generator=g)).to(dtype)

    sd = {"tok_embeddings.weight": r(V, D, std=1.0)}
    for i in range(L):
        p = f"layers.{i}."
        sd |= {p + "attention.wq.weight": r(H * K, D, std=0.3), p + "attention.wk.weight": r(KV * K, D, std=0.3),
               p + "attention.wv.weight": r(KV * K, D), p + "attention.wo.weight": r(D, H * K),
               p + "feed_forward.w1.weight": r(F, D), p + "feed_forward.w2.weight": r(D, F),
               p + "feed_forward.w3.weight": r(F, D), p + "attention_norm.weight": r(D, mean=1.0),
               p + "ffn_norm.weight": r(D, mean=1.0)}
    sd |= {"norm.weight": r(D, mean=1.0)}
    sd["output.weight"] = sd["tok_embeddings.weight"].clone() if tied else r(V, D)
    return sd


def split_meta(sd, shards):
    """Independent splitter following fairscale's layers: VocabParallelEmbedding (vocab ranges from
    fairscale's VocabUtility), ColumnParallelLinear (out rows), RowParallelLinear (in columns), norms
    copied; wk/wv rows of the KV heads that each shard's query heads attend to (GQA groups)."""
    from fairscale.nn.model_parallel.utils import VocabUtility
    out = [{} for _ in range(shards)]
    for name, t in sd.items():
        for r in range(shards):
            if name.endswith(("wo.weight", "w2.weight")):
                part = t.chunk(shards, dim=1)[r]
            elif name.endswith(("wk.weight", "wv.weight")):
                q_heads = range(r * H // shards, (r + 1) * H // shards)
                kv_heads = sorted({h // (H // KV) for h in q_heads})
                part = torch.cat([t[h * K:(h + 1) * K] for h in kv_heads])
            elif name == "tok_embeddings.weight":
                lo, hi = VocabUtility.vocab_range_from_global_vocab_size(V, r, shards)
                part = t[lo:hi]
            elif name.endswith(("wq.weight", "w1.weight", "w3.weight")) or name == "output.weight":
                part = t.chunk(shards, dim=0)[r]
            else:
                part = t
            out[r][name] = part.clone()
    return out


def save_meta(path, shard_dicts, params):
    path.mkdir(parents=True)
    (path / "params.json").write_text(json.dumps(params))
    for r, sd in enumerate(shard_dicts):
        torch.save(sd, path / f"consolidated.{r:02d}.pth")
    return path


def load_meta(path):
    files = sorted(path.glob("consolidated.*.pth"))
    return [torch.load(f, map_location="cpu", weights_only=True) for f in files], json.loads(
        (path / "params.json").read_text())


def assert_same_shards(a, b):
    assert len(a) == len(b)
    for r, (sa, sb) in enumerate(zip(a, b)):
        assert list(sa) == list(sb), r
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), (r, k)


def assert_same_meta_args(p, q):
    """The params.json keys Meta's ModelArgs reads; the FFN pair only has to give the same width."""
    for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "norm_eps", "rope_theta", "use_scaled_rope"):
        assert p[k] == q[k], k
    assert meta_ffn(p) == meta_ffn(q)


def meta_logits(path, tokens):
    """Logits of Meta's reference Transformer, built the way llama_models' Llama.build does."""
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.model import Transformer
    params = json.loads((path / "params.json").read_text())
    args = ModelArgs(max_seq_len=64, max_batch_size=tokens.shape[0], **params)
    model = Transformer(args)
    sd = torch.load(path / "consolidated.00.pth", map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model(torch.tensor(tokens), 0).numpy()


def jax_logits(model_or_dir, tokens, params=None):
    import jax.numpy as jnp
    from flax import nnx
    model = model_or_dir
    if not hasattr(model, "cfg"):
        model = checkpoint.load_model(model_or_dir, dtype="float32")
    if params is not None:
        nnx.update(model, params)
    B, T_ = tokens.shape
    pos = np.broadcast_to(np.arange(T_, dtype=np.int32), (B, T_))
    logits, _ = model(jnp.asarray(tokens, jnp.int32), jnp.asarray(pos), jnp.ones((B, T_), jnp.int32))
    return np.asarray(logits), model


def assert_close(a, ref, rel=1e-5):
    err = np.abs(a - ref).max()
    assert err <= rel * np.abs(ref).max(), f"max error {err:.3g} vs scale {np.abs(ref).max():.3g}"


def jax_params(path):
    return checkpoint.restore_params(path)[1]


def flat(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from flat(v, f"{prefix}{k}/")
        else:
            yield prefix + k, np.asarray(v)


def tokens(seed=0, batch=2):
    return np.random.RandomState(seed).randint(0, V, (batch, T))


@pytest.fixture(scope="session", autouse=True)
def model_parallel():
    """One-process gloo group + fairscale model parallel of size 1: what Meta's layers need on CPU."""
    import fairscale.nn.model_parallel.initialize as fs_init
    import torch.distributed as dist
    created = not dist.is_initialized()
    if created:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(1)
    yield
    if created:
        fs_init.destroy_model_parallel()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random 1-shard float32 Meta checkpoint (untied, scaled rope) and its jax conversion."""
    root = tmp_path_factory.mktemp("meta")
    sd = random_meta(seed=1)
    src = save_meta(root / "meta1", [sd], meta_params(scaled=True))
    convert(src, root / "jax1", src_format="meta", dst_format="jax", progress=False)
    return root, sd


# ------------------------------------------------------------------------------------ 1. logits


@pytest.mark.parametrize("scaled", [False, True])
def test_meta_to_jax_logits_match_meta_reference(tmp_path, scaled, base):
    root, sd = base
    if scaled:
        src, dst = root / "meta1", root / "jax1"
    else:
        sd = random_meta(seed=2)
        src = save_meta(tmp_path / "meta", [sd], meta_params(scaled=False))
        dst = tmp_path / "jax"
        convert(src, dst, src_format="meta", dst_format="jax", progress=False)
    cfg = checkpoint.load_config(dst)
    assert (cfg.rope_scaling is not None) == scaled and not cfg.tie_embeddings
    if scaled:  # Meta's reference hard-codes these
        assert dataclasses.astuple(cfg.rope_scaling) == (8.0, 1.0, 4.0, 8192)
    toks = tokens()
    ref = meta_logits(src, toks)
    ours, model = jax_logits(dst, toks)
    assert_close(ours, ref)
    # control: without the rotary permutation (Meta rows taken as-is) the logits are far off
    params = jax_params(dst)
    for name, n in (("wq", H), ("wk", KV)):
        params["layers"][name] = np.stack([sd[f"layers.{i}.attention.{name}.weight"].numpy().T.reshape(D, n, K)
                                           for i in range(L)])
    wrong, _ = jax_logits(model, toks, params)
    assert np.abs(wrong - ref).max() > 1e-3 * np.abs(ref).max()


# ------------------------------------------------------------------- 2 + 3. shards and round trips


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_sharded_meta_reads_the_same_and_round_trips_bit_exact(tmp_path, base, shards):
    root, sd = base
    parts = split_meta(sd, shards)
    if shards == 2:  # the splitter agrees with llama_models' own shard merge
        from llama_models.checkpoint import reshard_mp
        merged = reshard_mp(parts, size=1, rank=0)
        assert all(torch.equal(merged[k], sd[k]) for k in sd)
    if shards == 4:  # 4 shards > 2 KV heads: each KV head is stored twice
        assert torch.equal(parts[0]["layers.0.attention.wk.weight"], parts[1]["layers.0.attention.wk.weight"])
    src = save_meta(tmp_path / "meta", parts, meta_params(scaled=True))
    convert(src, tmp_path / "jax", src_format="meta", dst_format="jax", progress=False)
    one, many = dict(flat(jax_params(root / "jax1"))), dict(flat(jax_params(tmp_path / "jax")))
    assert sorted(one) == sorted(many)
    for k in one:
        assert one[k].dtype == many[k].dtype and np.array_equal(one[k], many[k]), k
    convert(tmp_path / "jax", tmp_path / "back", src_format="jax", dst_format="meta", shards=shards, progress=False)
    back, params = load_meta(tmp_path / "back")
    assert_same_shards(parts, back)
    assert_same_meta_args(meta_params(scaled=True), params)
    assert params["rope_scaling_factor"] == 8.0 and "max_seq_len" not in params


# -------------------------------------------------------------------------- 4. hf <-> meta


def make_hf(path, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    c = LlamaConfig(vocab_size=V, hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=10, rms_norm_eps=1e-5, max_position_embeddings=64,
                    rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, initializer_range=0.2)
    m = LlamaForCausalLM(c).eval()
    m.save_pretrained(path)
    return m


def test_hf_to_meta_runs_in_meta_reference_like_transformers(tmp_path):
    hf = make_hf(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "meta", src_format="hf", dst_format="meta", progress=False)
    toks = tokens(seed=3)
    with torch.no_grad():
        ref = hf(torch.tensor(toks)).logits.numpy()
    assert_close(meta_logits(tmp_path / "meta", toks), ref)
    # and back to hf bit-exact
    from transformers import AutoModelForCausalLM
    convert(tmp_path / "meta", tmp_path / "hf2", src_format="meta", dst_format="hf", progress=False)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf2")
    sa, sb = hf.state_dict(), back.state_dict()
    assert sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_meta_to_hf_to_meta_bit_exact(tmp_path, base):
    root, sd = base
    convert(root / "meta1", tmp_path / "hf", src_format="meta", dst_format="hf", progress=False)
    convert(tmp_path / "hf", tmp_path / "meta", src_format="hf", dst_format="meta", shards=2, progress=False)
    back, params = load_meta(tmp_path / "meta")
    assert_same_shards(split_meta(sd, 2), back)
    assert_same_meta_args(meta_params(scaled=True), params)


# ------------------------------------------------------------------------------------ 5. bfloat16


def test_bfloat16_kept_and_float32_on_request(tmp_path):
    sd = random_meta(seed=4, dtype=torch.bfloat16)
    parts = split_meta(sd, 2)
    src = save_meta(tmp_path / "meta", parts, meta_params())
    cfg = convert(src, tmp_path / "jax", src_format="meta", dst_format="jax", progress=False)
    assert cfg.param_dtype == "bfloat16"
    params = jax_params(tmp_path / "jax")
    emb = np.asarray(params["embed"])
    assert emb.dtype == ml_dtypes.bfloat16
    assert np.array_equal(emb.view(np.int16), sd["tok_embeddings.weight"].view(torch.int16).numpy())
    convert(tmp_path / "jax", tmp_path / "back", src_format="jax", dst_format="meta", shards=2, progress=False)
    assert_same_shards(parts, load_meta(tmp_path / "back")[0])
    rc = cli.main(["convert", "--from", "meta", "--to", "jax", str(src), str(tmp_path / "jax32"),
                   "--dtype", "float32", "--quiet"])
    assert rc == 0
    p32 = jax_params(tmp_path / "jax32")
    assert np.asarray(p32["embed"]).dtype == np.float32
    assert np.array_equal(np.asarray(p32["embed"]), sd["tok_embeddings.weight"].float().numpy())
    assert np.array_equal(np.asarray(p32["lm_head"]), sd["output.weight"].float().numpy().T)


# ------------------------------------------------------------------------------------ 6. tied


def test_tied_embeddings_detected_and_round_trip(tmp_path):
    sd = random_meta(seed=5, tied=True)
    assert sd["output.weight"].data_ptr() != sd["tok_embeddings.weight"].data_ptr()
    src = save_meta(tmp_path / "meta", [sd], meta_params(scaled=True))
    cfg = convert(src, tmp_path / "hf", src_format="meta", dst_format="hf", progress=False)
    assert cfg.tie_embeddings and cfg.rope_scaling.factor == 32.0  # Llama 3.2's factor
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_cfg["tie_word_embeddings"] is True
    convert(tmp_path / "hf", tmp_path / "back", src_format="hf", dst_format="meta", shards=2, progress=False)
    back, params = load_meta(tmp_path / "back")
    assert_same_shards(split_meta(sd, 2), back)  # output.weight written, equal to the embedding
    assert params["rope_scaling_factor"] == 32.0
    assert MetaReader(tmp_path / "back").config == cfg
    # one element off: not tied; output.weight absent: tied
    sd_untied = dict(sd, **{"output.weight": sd["output.weight"].clone()})
    sd_untied["output.weight"][3, 5] += 1.0
    assert not MetaReader(save_meta(tmp_path / "untied", [sd_untied], meta_params())).config.tie_embeddings
    sd_absent = {k: v for k, v in sd.items() if k != "output.weight"}
    assert MetaReader(save_meta(tmp_path / "absent", [sd_absent], meta_params())).config.tie_embeddings


# ------------------------------------------------------------------------------------ 7. bad input


def _fails(tmp_path, src, match, **kw):
    dst = tmp_path / "out"
    with pytest.raises(ConvertError, match=match) as e:
        convert(src, dst, src_format=kw.pop("src_format", "meta"), dst_format=kw.pop("dst_format", "jax"),
                progress=False, **kw)
    assert "\n" not in str(e.value)
    assert not dst.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp dir left
    return str(e.value)


def test_bad_inputs(tmp_path):
    sd = random_meta(seed=6)
    params = meta_params()

    no_params = save_meta(tmp_path / "a", [sd], params)
    (no_params / "params.json").unlink()
    _fails(tmp_path, no_params, "params.json")

    no_files = tmp_path / "b"
    no_files.mkdir()
    (no_files / "params.json").write_text(json.dumps(params))
    _fails(tmp_path, no_files, "consolidated")

    cut = save_meta(tmp_path / "c", split_meta(sd, 2), params)
    raw = (cut / "consolidated.01.pth").read_bytes()
    (cut / "consolidated.01.pth").write_bytes(raw[: len(raw) // 2])
    _fails(tmp_path, cut, r"consolidated\.01\.pth")

    missing = save_meta(tmp_path / "d", [{k: v for k, v in sd.items() if k != "layers.1.feed_forward.w3.weight"}],
                        params)
    _fails(tmp_path, missing, r"consolidated\.00\.pth.*layers\.1\.feed_forward\.w3\.weight")

    shaped = save_meta(tmp_path / "e", [dict(sd, **{"layers.0.attention.wk.weight": torch.zeros(K, D)})], params)
    _fails(tmp_path, shaped, r"consolidated\.00\.pth.*layers\.0\.attention\.wk\.weight.*shape")

    extra = save_meta(tmp_path / "f", [dict(sd, **{"layers.2.attention.wq.weight": torch.zeros(D, D)})], params)
    _fails(tmp_path, extra, r"unexpected tensor layers\.2\.attention\.wq\.weight")

    parts = split_meta(sd, 2)
    del parts[1]["layers.0.ffn_norm.weight"]
    _fails(tmp_path, save_meta(tmp_path / "g", parts, params), r"consolidated\.01\.pth.*layers\.0\.ffn_norm\.weight")

    parts = split_meta(sd, 4)  # the two stored copies of a KV head disagree
    parts[3]["layers.1.attention.wv.weight"][0, 0] += 1.0
    _fails(tmp_path, save_meta(tmp_path / "h", parts, params), r"consolidated\.03\.pth.*layers\.1\.attention\.wv")

    _fails(tmp_path, save_meta(tmp_path / "i", split_meta(sd, 2), params | {"n_layers": 3}),
           r"missing tensor layers\.2\.")

    ok = save_meta(tmp_path / "j", [sd], params)  # 3 shards do not divide 4 heads
    _fails(tmp_path, ok, "3 model-parallel shards", dst_format="meta", shards=3)


def test_cli_reports_one_line(tmp_path, capsys):
    src = save_meta(tmp_path / "meta", [random_meta(seed=7)], meta_params())
    (src / "consolidated.00.pth").write_bytes(b"not a zip file")
    rc = cli.main(["convert", "--from", "meta", "--to", "jax", str(src), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "consolidated.00.pth" in err
    assert not (tmp_path / "out").exists()
