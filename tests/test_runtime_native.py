"""The runtime on the native CPU engine, under every ISA this machine runs (forced in turn).

- F32 layouts: the engine's arithmetic is f32, so its logits meet the runtime's oracle bound against
  transformers (1e-4, top-1 equal everywhere).
- Integer layouts quantize every activation to int8 per block, and BF16 layouts (ggml BF16 rows, amx-bf16
  tiles) round it to bf16 (the engine's definitions, runtime.cpu_ops.quantize_act; llama.cpp's BF16 dot
  does the same). Each operation is checked where it is exact: every CPU linear of the
  pack against the reference engine given the same quantized inputs ("ref-actq"), within 1e-5 of the
  output scale; every routed-experts layer within 1e-2 (its intermediate h is quantized again, and a
  code of h may round the other way on an ulp of difference). Whole-model logits are not a bound: a
  quantization code that flips on a 1e-7 difference moves its value by d = amax/127, and a flipped
  router choice changes a token's experts, so the test states what the engine delivers against the
  ref-actq oracle on 80 positions — rms difference <= 20% of the logits' rms (measured 1-10%; it varies
  with where codes flip) and the same top-1 on >= 85% of positions (measured 92-100%) — which a wrong
  kernel misses by far (a skipped or mis-scaled block gives rms ~100%).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from oracle import Packs, compare, hf_logits, kt_run_cmd, oracle_for, session_packs

from ktpack import kernels as K
from ktpack.kernels import _native
from ktpack.runtime import cpu_ops
from ktpack.runtime.model import DeepseekV3Model, KVCache
from ktpack.runtime.weights import load_pack

ISAS = []
for _name in K.ISAS:
    _ok, _why = K.supported(_name)
    _marks = [pytest.mark.amx] if _name == "amx" else []
    if not _ok:
        _marks.append(pytest.mark.skip(reason=f"this CPU/OS cannot run {_name}: {_why}"))
    ISAS.append(pytest.param(_name, marks=_marks, id=_name))

FLOAT_PACKS = [
    ("tiny-F32.gguf", {"target": "cpu"}),
]
ROUNDED_PACKS = [  # activations quantized to int8 or rounded to bf16
    ("tiny-BF16.gguf", {"target": "cpu"}),
    ("tiny-F32.gguf", {"target": "gpu", "cpu_layout": "amx-bf16", "numa_nodes": 2}),
    ("tiny-Q8_0.gguf", {"target": "cpu"}),
    ("tiny-Q4_K_M.gguf", {"target": "cpu", "numa_nodes": 2}),
    ("tiny-Q5_K.gguf", {"target": "cpu"}),
    ("tiny-Q6_K.gguf", {"target": "cpu"}),
    ("tiny-Q8_0.gguf", {"target": "gpu", "cpu_layout": "amx-int8", "numa_nodes": 3}),
    ("tiny-Q8_0.gguf", {"target": "gpu", "cpu_layout": "amx-int4"}),
]


def _pid(p):
    src, opts = p
    return src.removeprefix("tiny-").removesuffix(".gguf") + "-" + "-".join(str(v) for v in opts.values())


@pytest.fixture(scope="module")
def packs(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Packs:
    return session_packs(tmp_path_factory, tiny_dir)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 4096, (80,), generator=torch.Generator().manual_seed(1234))


def logits(folder: Path, ids: torch.Tensor, engine: str) -> torch.Tensor:
    model = DeepseekV3Model(load_pack(folder, engine=engine))
    return model.forward(ids, 0, KVCache(model.config, 96))


_ref_cache: dict[tuple, torch.Tensor] = {}


def ref_actq_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    key = (str(folder), tuple(ids.tolist()))
    if key not in _ref_cache:
        _ref_cache[key] = logits(folder, ids, "ref-actq")
    return _ref_cache[key]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("pack", FLOAT_PACKS, ids=_pid)
def test_float_layouts_match_transformers(isa, pack, isa_env, packs, tiny_dir, ids):
    isa_env(isa)
    folder = packs(pack[0], **pack[1])
    pk = load_pack(folder, engine="native")
    assert any(isinstance(pk.linear(n), cpu_ops.NativeLinear) for n in pk.entries if n.endswith("attn_q_a.weight")) or (
        pack[1]["target"] == "gpu"
    )
    assert isinstance(pk.experts(1), cpu_ops.NativeExperts)
    want = hf_logits(oracle_for(tiny_dir, folder), ids)
    diff = compare(logits(folder, ids, "native"), want)
    print(f"\n[{isa}] {_pid(pack)} native vs transformers: max |diff| {diff:.3g}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("pack", ROUNDED_PACKS, ids=_pid)
def test_rounded_layouts_per_op_and_model(isa, pack, isa_env, packs, ids):
    isa_env(isa)
    folder = packs(pack[0], **pack[1])
    native = load_pack(folder, engine="native")
    ref = load_pack(folder, engine="ref-actq")
    gen = torch.Generator().manual_seed(7)
    n_native = 0
    for name, t in native.entries.items():
        if t.placement != "cpu" or "_exps." in name or not name.endswith(".weight") or t.shape[-1] < 16:
            continue
        if name.endswith("norm.weight") or name == "token_embd.weight":
            continue
        a, b = native.linear(name), ref.linear(name)
        if not isinstance(a, cpu_ops.NativeLinear):
            continue
        n_native += 1
        x = torch.randn(5, *t.shape[:-2], t.shape[-1], generator=gen)
        ya, yb = a(x), b(x)
        assert (ya - yb).abs().max() <= 1e-5 * yb.abs().max(), name
    if pack[1]["target"] == "cpu":
        assert n_native >= 10, "the attention/dense/shared/head linears should run natively"
    cfg = native.config
    for layer in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        ea, eb = native.experts(layer), ref.experts(layer)
        assert isinstance(ea, cpu_ops.NativeExperts)
        x = torch.randn(9, cfg.hidden_size, generator=gen)
        idx = torch.stack(
            [torch.randperm(cfg.n_routed_experts, generator=gen)[: cfg.num_experts_per_tok] for _ in range(9)]
        )
        w = torch.rand(9, cfg.num_experts_per_tok, generator=gen)
        ya, yb = ea(x, idx, w), eb(x, idx, w)
        # h = silu(g)·u is computed in C++ and in torch (exp differs by <= 2 ulp) before it is quantized
        # again for down, so a code of h may round the other way: one flip moves a term by d_h·|w| ≈ 1e-3
        # of the output. 1e-2 admits a few; a wrong kernel is off by ~100%.
        assert (ya - yb).abs().max() <= 1e-2 * yb.abs().max(), f"experts of layer {layer}"
    got, want = logits(folder, ids, "native"), ref_actq_logits(folder, ids)
    rms = (got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt()
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean()
    print(f"\n[{isa}] {_pid(pack)} native vs ref-actq: rms {rms:.3g} of rms(logits), top-1 agree {agree:.3f}")
    assert rms <= 0.2 and agree >= 0.85


def test_kt_run_uses_the_native_engine(packs, tmp_path, ids):
    """The command line's default engine is the native one: `kt-run --score` equals the in-process
    native logits (same ISA, the best this machine has), and differs from the f32 reference."""
    folder = packs("tiny-Q4_K_M.gguf", target="cpu", numa_nodes=2)
    np.save(tmp_path / "ids.npy", ids.numpy().astype(np.int64))
    env = {k: v for k, v in os.environ.items() if k not in ("KTPACK_ENGINE", "KTPACK_ISA")}
    out = tmp_path / "logits.npy"
    r = subprocess.run(
        [*kt_run_cmd(), str(folder), "--score", str(tmp_path / "ids.npy"), "--logits-out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    _native.select_isa(K.best()[0])
    mine = logits(folder, ids, "native").numpy()
    got = np.load(out)
    assert np.abs(got - mine).max() <= 1e-4
    assert np.abs(got - logits(folder, ids, "ref").numpy()).max() > 1e-3
