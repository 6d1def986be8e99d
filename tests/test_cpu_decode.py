"""The native decode step (runtime/cpu_decode.py, kernels/src/decode.cpp) against the torch model it replaces.

Both run the same weight operations on the same cache contents; they differ in the glue's float
summation order (RMSNorm sums, attention dots, softmax), i.e. by f32 rounding:

- F32 packs: no activation is rounded, so the step equals the torch forward within 1e-4 (measured ~2e-6
  to 4e-6), top-1 equal, on 32 teacher-forced steps, under every ISA this CPU runs;
- integer packs quantize every activation to int8 codes per block, and BF16 packs round it to bf16: a
  value on a rounding boundary may go the other way on an ulp of difference, which moves it by amax/127
  (2^-8 relative for bf16), and a near-tie router choice may flip. That sensitivity is the torch path's
  own: perturbing its input by 2^-22 (relative) moves the tiny model's logits by up to 0.05 on Q8_0 and
  Q4_K_M. So each of 16 single steps from the same prefilled cache must be within 0.25 (5x that), and
  most of them (>= 10 of 16) exact to 1e-3 — a wrong kernel, head, rope or cache row misses both on
  every step. A flipped bf16 rounding moves less:
  over 4 prompts, 0.005 to 0.017, with 8 to 14 of the 16 steps bit-equal; BF16 must be within 0.05 with
  >= 6 of 16 exact to 1e-3.
- the router alone: the same experts and weights (1e-6) as runtime/moe.py's Router on the same input.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracle import session_packs
from test_runtime_native import ISAS

from ktpack.runtime import cpu_decode
from ktpack.runtime.engine import Engine
from ktpack.runtime.model import DeepseekV3Model, KVCache
from ktpack.runtime.moe import MoE
from ktpack.runtime.sampling import SamplingParams
from ktpack.runtime.weights import load_pack

CTX = 96


@pytest.fixture(scope="module")
def packs(tmp_path_factory, tiny_dir):
    return session_packs(tmp_path_factory, tiny_dir)


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 4096, (n,), generator=torch.Generator().manual_seed(seed))


def _setup(folder, prompt: torch.Tensor, dtype: torch.dtype = torch.float32):
    model = DeepseekV3Model(load_pack(folder, engine="native"))
    cache = KVCache(model.config, CTX, dtype=dtype)
    model.forward(prompt, 0, cache)
    step = cpu_decode.build(model, cache)
    assert step is not None, "a --target cpu pack must take the native decode step"
    return model, cache, step


def _with_ref_cache(folder, prompt: torch.Tensor, dtype: torch.dtype = torch.float32):
    """_setup, plus a copy of the prompt's cache for the torch model to extend alongside the native step."""
    model, cache, step = _setup(folder, prompt, dtype)
    assert cache.c_kv.dtype == dtype
    ref_cache = KVCache(model.config, CTX, dtype=dtype)
    ref_cache.c_kv.copy_(cache.c_kv)
    ref_cache.k_pe.copy_(cache.k_pe)
    return model, cache, step, ref_cache


def _torch_step(model, cache, tok: int, pos: int) -> torch.Tensor:
    return model.forward(torch.tensor([tok]), pos, cache)[-1]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("src", ["tiny-F32.gguf"])
def test_float_pack_decode_equals_torch(isa, src, isa_env, packs):
    isa_env(isa)
    prompt, toks = _ids(24, 1), _ids(32, 2)
    model, cache, step, ref_cache = _with_ref_cache(packs(src, target="cpu"), prompt)
    worst = 0.0
    for i, tok in enumerate(toks.tolist()):
        got = step(tok, 24 + i).clone()
        want = _torch_step(model, ref_cache, tok, 24 + i)
        worst = max(worst, (got - want).abs().max().item())
        assert worst <= 1e-4, f"step {i}: max |diff| {worst:.3g}"
        assert got.argmax() == want.argmax(), f"step {i}: top-1 differs"
    assert (cache.c_kv - ref_cache.c_kv).abs().max() <= 1e-5
    assert (cache.k_pe - ref_cache.k_pe).abs().max() <= 1e-5
    print(f"\n[{isa}] {src}: native decode vs torch, 32 steps, max |diff| {worst:.3g}")


@pytest.mark.parametrize("isa", ISAS)
def test_f16_cache_decode_equals_torch(isa, isa_env, packs):
    """An f16 KV cache (kt-run --kv-cache f16): the step reads the same half values the torch model reads
    (widened exactly) and writes its new rows rounded to nearest even as torch's .to(float16) does, so on a
    float pack it equals the torch forward over the same f16 cache within 2e-4 (the f32 glue's rounding as
    above, plus the rows' rare one-ulp differences: measured 3e-5 to 7e-5), and the rows it writes are
    torch's: nearly all bit-equal, the rest within 2^-10 relative (two
    roundings of f32 values that differ by the glue's rounding, < 5e-5 absolute in the deepest layer); and
    it stays close to the f32-cache step (the cache's half rounding, 2^-11 relative per value)."""
    isa_env(isa)
    prompt, toks = _ids(24, 1), _ids(16, 2)
    model, cache, step, ref_cache = _with_ref_cache(packs("tiny-F32.gguf", target="cpu"), prompt, torch.float16)
    _, cache32, step32 = _setup(packs("tiny-F32.gguf", target="cpu"), prompt)
    worst = worst32 = 0.0
    for i, tok in enumerate(toks.tolist()):
        got = step(tok, 24 + i).clone()
        want = _torch_step(model, ref_cache, tok, 24 + i)
        worst = max(worst, (got - want).abs().max().item())
        assert got.argmax() == want.argmax(), f"step {i}: top-1 differs"
        worst32 = max(worst32, (got - step32(tok, 24 + i)).abs().max().item())
    assert worst <= 2e-4, worst
    for a, b in ((cache.c_kv, ref_cache.c_kv), (cache.k_pe, ref_cache.k_pe)):
        a, b = a[:, : 24 + len(toks)].float(), b[:, : 24 + len(toks)].float()
        assert ((a - b).abs() <= 2.0**-10 * b.abs() + 5e-5).all()
        assert (a != b).float().mean() < 0.01  # nearly all bit-equal
    assert 0 < worst32 < 0.05, worst32
    print(f"\n[{isa}] f16 cache: vs torch on the same cache {worst:.3g}, vs the f32-cache step {worst32:.3g}")


@pytest.mark.parametrize("isa", ISAS)
def test_bf16_cache_decode(isa, isa_env, packs):
    """A bf16 KV cache (kt-run --kv-cache bf16): the step writes its new rows rounded to nearest even as
    torch's .to(bfloat16) does, reads them widened exactly, and multiplies them with the queries and the
    softmax weights rounded to bf16 (vdpbf16ps's operands; test_kernels_native checks that arithmetic per
    kernel). Against the torch model over the same bf16 cache (unrounded queries and weights; 16 steps on
    a float pack): the rounding of q and p (2^-9 relative per value) moves the tiny model's logits by
    < 0.01 (measured 0.007 to 0.008): bound 0.03, top-1 the same on >= 14 of 16 steps. The rows layer 0
    writes are torch's (its input has no attention in it yet: nearly all bit-equal, the rest one bf16 ulp,
    2^-8 relative); deeper layers' rows carry the attention's difference (measured <= 0.016): bound 0.05."""
    isa_env(isa)
    prompt, toks = _ids(24, 1), _ids(16, 2)
    model, cache, step, ref_cache = _with_ref_cache(packs("tiny-F32.gguf", target="cpu"), prompt, torch.bfloat16)
    worst, same = 0.0, 0
    for i, tok in enumerate(toks.tolist()):
        got = step(tok, 24 + i).clone()
        want = _torch_step(model, ref_cache, tok, 24 + i)
        worst = max(worst, (got - want).abs().max().item())
        same += int(got.argmax() == want.argmax())
    assert 0 < worst <= 0.03, worst
    assert same >= 14, same
    end = 24 + len(toks)
    for a, b in ((cache.c_kv, ref_cache.c_kv), (cache.k_pe, ref_cache.k_pe)):
        a, b = a[:, 24:end].float(), b[:, 24:end].float()
        assert ((a[0] - b[0]).abs() <= 2.0**-8 * b[0].abs()).all()
        assert (a[0] != b[0]).float().mean() < 0.01
        assert (a - b).abs().max() <= 0.05
    print(f"\n[{isa}] bf16 cache: vs torch on the same cache {worst:.3g}, top-1 same {same}/16")


def test_bf16_cache_prefill_probs(packs, monkeypatch):
    """A prefill of several query blocks over a bf16 cache takes its attention probabilities (scores, causal
    mask, softmax) from the native kernels (cpu_ops.prefill_probs_bf16): the logits of torch's f32 products
    of the bf16-rounded queries with the widened cache rows, masked and softmaxed by torch. Only the
    summation order and the exponential differ (~1e-7 relative), but that can flip the bf16 rounding of a
    row a later layer writes into the cache (2^-8 relative, as in test_bf16_cache_decode): measured 1e-3 on
    the tiny model's logits, bound 0.01, top-1 the same at >= 148 of 150 positions."""
    from ktpack.runtime import model as model_mod

    folder = packs("tiny-F32.gguf", target="cpu")
    ids = _ids(150, 4)
    calls = []

    def counted(*args):
        calls.append(args[0].shape[0])
        return native(*args)

    def torch_probs(q, qr, c, kr, scale, heads, pos0, out):
        torch.addmm(out, q.bfloat16().float(), c.float().t(), beta=0, alpha=scale, out=out)
        out.addmm_(qr.bfloat16().float(), kr.float().t(), alpha=scale)
        query_pos = pos0 + torch.arange(out.shape[0]) // heads
        out.masked_fill_(torch.arange(out.shape[1])[None, :] > query_pos[:, None], float("-inf"))
        out.copy_(torch.softmax(out, dim=-1))

    native = model_mod.prefill_probs_bf16
    logits = []
    for fn in (counted, torch_probs):
        monkeypatch.setattr(model_mod, "prefill_probs_bf16", fn)
        model = DeepseekV3Model(load_pack(folder, engine="native"))
        logits.append(model.forward(ids, 0, KVCache(model.config, 160, dtype=torch.bfloat16)))
    assert len(calls) == 3 * model.config.num_hidden_layers  # 150 tokens: 3 query blocks per layer
    diff = (logits[0] - logits[1]).abs().max().item()
    assert diff <= 0.01, diff
    assert (logits[0].argmax(-1) == logits[1].argmax(-1)).sum() >= 148


def test_native_prefill_values(packs, monkeypatch):
    """A prefill of several query blocks takes its attention values (probabilities times the cached rows'
    v_b products) from the native engine (cpu_ops.prefill_values): torch's einsum's logits within 1e-4 (the
    oracle tests' bound; only the f32 summation order differs), over an f32 cache."""
    from ktpack.runtime import model as model_mod

    folder = packs("tiny-Q8_0.gguf", target="cpu")
    ids = _ids(150, 5)
    calls = []

    def counted(p, v, out):
        calls.append(tuple(p.shape))
        native(p, v, out)

    def torch_values(p, v, out):
        out.copy_(torch.einsum("thn,nhv->thv", p, v))

    native = model_mod.prefill_values
    logits = []
    for fn in (counted, torch_values):
        monkeypatch.setattr(model_mod, "prefill_values", fn)
        model = DeepseekV3Model(load_pack(folder, engine="native"))
        logits.append(model.forward(ids, 0, KVCache(model.config, 160)))
    assert len(calls) == 3 * model.config.num_hidden_layers  # 150 tokens: 3 query blocks per layer
    diff = (logits[0] - logits[1]).abs().max().item()
    assert diff <= 1e-4 and torch.equal(logits[0].argmax(-1), logits[1].argmax(-1)), diff


def test_settle_torch_threads(packs, monkeypatch):
    """kt-run / kt-serve leave torch one thread beside the native engine's pool (KTPACK_TORCH_THREADS
    overrides; a bad value is an EngineError) and let the pool's threads spin 1 ms (unless KTPACK_SPIN_US is
    set); the reference engine keeps torch's threads."""
    from ktpack.kernels import _native
    from ktpack.runtime.engine import EngineError

    folder = packs("tiny-Q8_0.gguf", target="cpu")
    before, spin = torch.get_num_threads(), _native.spin_us()
    try:
        torch.set_num_threads(2)
        Engine(folder, ctx_size=32, engine="ref").settle_torch_threads()
        assert torch.get_num_threads() == 2
        eng = Engine(folder, ctx_size=32, engine="native")
        monkeypatch.setenv("KTPACK_TORCH_THREADS", "two")
        with pytest.raises(EngineError, match="KTPACK_TORCH_THREADS must be a positive integer, got 'two'"):
            eng.settle_torch_threads()
        monkeypatch.delenv("KTPACK_TORCH_THREADS")
        monkeypatch.delenv("KTPACK_SPIN_US", raising=False)
        eng.settle_torch_threads()
        assert torch.get_num_threads() == 1 and _native.spin_us() == 1000
    finally:
        torch.set_num_threads(before)
        _native.set_spin_us(spin)


def test_kv_cache_option(packs):
    from ktpack.runtime.engine import Engine, EngineError

    folder = packs("tiny-Q8_0.gguf", target="cpu")
    eng = Engine(folder, ctx_size=64, engine="native", kv_cache="f16")
    assert eng.cache.c_kv.dtype == torch.float16 and eng._step is not None
    out = eng.generate(_ids(8, 3).tolist(), SamplingParams(temperature=0), max_new_tokens=4, ignore_eos=True)
    assert len(out.output_ids) == 4
    eng = Engine(folder, ctx_size=64, engine="native", kv_cache="bf16")
    assert eng.cache.c_kv.dtype == torch.bfloat16 and eng._step is not None
    out16 = eng.generate(_ids(8, 3).tolist(), SamplingParams(temperature=0), max_new_tokens=4, ignore_eos=True)
    assert len(out16.output_ids) == 4
    with pytest.raises(EngineError, match="--kv-cache must be one of f32, f16, bf16"):
        Engine(folder, ctx_size=64, engine="native", kv_cache="q8")


@pytest.mark.parametrize(
    "src,opts",
    [
        ("tiny-Q8_0.gguf", {"target": "cpu"}),
        ("tiny-Q4_K_M.gguf", {"target": "cpu", "numa_nodes": 2}),
        ("tiny-Q8_0.gguf", {"target": "cpu", "cpu_layout": "amx-int8"}),
        ("tiny-Q8_0.gguf", {"target": "cpu", "cpu_layout": "amx-int4"}),
        ("tiny-BF16.gguf", {"target": "cpu"}),
    ],
    ids=["Q8_0", "Q4_K_M-2nodes", "amx-int8", "amx-int4", "BF16"],
)
def test_rounded_activation_pack_single_steps(src, opts, packs):
    prompt = _ids(40, 3)
    model, cache, step = _setup(packs(src, **opts), prompt)
    saved = (cache.c_kv.clone(), cache.k_pe.clone())
    diffs = []
    for tok in _ids(16, 4).tolist():
        cache.c_kv.copy_(saved[0])
        cache.k_pe.copy_(saved[1])
        got = step(tok, 40).clone()
        cache.c_kv.copy_(saved[0])
        cache.k_pe.copy_(saved[1])
        want = _torch_step(model, cache, tok, 40)
        diffs.append((got - want).abs().max().item())
    exact = sum(d <= 1e-3 for d in diffs)
    print(f"\n{src} {opts}: 16 single steps, max |diff| {max(diffs):.3g}, {exact}/16 within 1e-3")
    worst, min_exact = (0.05, 6) if "BF16" in src else (0.25, 10)
    assert max(diffs) <= worst, diffs
    assert exact >= min_exact, diffs


@pytest.mark.parametrize("src", ["tiny-F32.gguf", "tiny-BF16.gguf", "tiny-Q8_0.gguf", "tiny-Q4_K_M.gguf"])
def test_native_embedding_is_the_packs(src, packs):
    """The step reads a token's embedding row itself (no Python between steps): the pack's lookup, bit for bit."""
    model, _, step = _setup(packs(src, target="cpu"), _ids(4, 9))
    assert step._embed is not None, "a ggml_rows token_embd must be read natively"
    for tok in [0, 1, 4095, *_ids(8, 10).tolist()]:
        assert torch.equal(torch.from_numpy(step._embed.row(tok)), model.pack.embedding(torch.tensor([tok]))[0])
    with pytest.raises(IndexError, match="outside the vocabulary"):
        step(model.config.vocab_size, 4)


def test_greedy_step_is_argmax_of_its_logits(packs):
    """The native greedy step (no tensor work between steps) picks torch.argmax of the logits it leaves."""
    model, cache, step = _setup(packs("tiny-Q8_0.gguf", target="cpu"), _ids(12, 11))
    saved = (cache.c_kv.clone(), cache.k_pe.clone())
    for i, tok in enumerate(_ids(6, 12).tolist()):
        cache.c_kv.copy_(saved[0])
        cache.k_pe.copy_(saved[1])
        want = step(tok, 12 + i).clone()
        cache.c_kv.copy_(saved[0])
        cache.k_pe.copy_(saved[1])
        got = step.greedy(tok, 12 + i)
        assert torch.equal(step.logits, want)
        assert got == int(torch.argmax(want))


def test_router_matches_torch(packs):
    model, cache, step = _setup(packs("tiny-Q8_0.gguf", target="cpu"), _ids(4, 5))
    gen = torch.Generator().manual_seed(6)
    checked = 0
    for layer, b in enumerate(model.blocks):
        if not isinstance(b.ffn, MoE):
            continue
        for scale in (0.1, 1.0, 10.0):
            f = torch.randn(1, model.config.hidden_size, generator=gen) * scale
            idx, w = b.ffn.router(f)
            n_idx, n_w = step.route(layer, f[0].numpy())
            order, n_order = np.argsort(idx[0].numpy()), np.argsort(n_idx)
            assert np.array_equal(idx[0].numpy()[order], n_idx[n_order]), (layer, scale)
            np.testing.assert_allclose(n_w[n_order], w[0].numpy()[order], rtol=0, atol=1e-6)
            checked += 1
    assert checked >= 3


def test_where_the_native_step_does_not_apply(packs, monkeypatch):
    # a GPU-target pack run on the CPU: attention weights are Marlin tensors unpacked to torch
    model = DeepseekV3Model(load_pack(packs("tiny-Q8_0.gguf", target="gpu"), engine="native"))
    assert cpu_decode.build(model, KVCache(model.config, CTX)) is None
    cpu = packs("tiny-F32.gguf", target="cpu")
    model = DeepseekV3Model(load_pack(cpu, engine="native"))
    model.flags.ignore_bias = True  # the sensitivity flags of runtime/moe.py
    assert cpu_decode.build(model, KVCache(model.config, CTX)) is None
    # the reference engine has no native operations at all
    model = DeepseekV3Model(load_pack(cpu, engine="ref"))
    assert cpu_decode.build(model, KVCache(model.config, CTX)) is None
    monkeypatch.setenv(cpu_decode.ENV, "0")
    assert Engine(cpu, ctx_size=CTX, engine="native")._step is None


def test_engine_greedy_native_equals_torch(packs, monkeypatch):
    folder = packs("tiny-F32.gguf", target="cpu")
    prompt = _ids(16, 8).tolist()
    eng = Engine(folder, ctx_size=CTX, engine="native")
    assert isinstance(eng._step, cpu_decode.NativeDecode)
    a = eng.generate(prompt, SamplingParams(temperature=0), max_new_tokens=24, ignore_eos=True).output_ids
    monkeypatch.setenv(cpu_decode.ENV, "0")
    b = (
        Engine(folder, ctx_size=CTX, engine="native")
        .generate(prompt, SamplingParams(temperature=0), max_new_tokens=24, ignore_eos=True)
        .output_ids
    )
    assert a == b
