"""The graph-ready decode step (runtime/graph.py) and the CPU-expert doorbell (runtime/doorbell.py).

On the CPU the decode step runs eagerly the exact code a GPU captures into one CUDA Graph: fixed-address
input, position and logits buffers, the static KV cache, and every MoE layer's routed experts reached through
the doorbell's staging buffers and worker thread. So it must give the eager `model.forward` (static cache)
bit for bit. Against the default windowed forward (attention over positions 0..pos only) the values agree
to float32 reduction order: the softmax and the attention sums run over a longer, zero-weighted tail.
runtime/gpu.py's placement runs here too, on the CPU with a reference stand-in for the Marlin GEMM.
On a GPU: the graph replay against the same step run eagerly, and kt-run's --no-graph against the graph.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from oracle import session_packs

from ktpack.runtime.doorbell import ABORT, DONE, LAYER, REQUEST, Doorbell, DoorbellError, ExpertWorker, StagedExperts
from ktpack.runtime.graph import DecodeStep
from ktpack.runtime.model import DeepseekV3Model
from ktpack.runtime.weights import load_pack

CTX = 64
PROMPT = [5, 17, 300, 42, 7]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with a CUDA build of torch")


@pytest.fixture(scope="module")
def gpu_pack(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    """The tiny F32 model converted with --target gpu (Marlin GPU side, CPU routed experts)."""
    return session_packs(tmp_path_factory, tiny_dir)("tiny-F32.gguf", target="gpu")


# ------------------------------------------------------------------------------------------------ doorbell


def _experts(seed: int, hidden: int = 32):
    """A deterministic experts callable (a function of x, ids and w, like the real ones)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(16, hidden, hidden, generator=g)

    def fn(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.einsum("tk,tkh->th", w, torch.einsum("th,tkhj->tkj", x, table[ids]))

    return fn


def _inputs(seed: int, tokens: int = 3, hidden: int = 32, topk: int = 2):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(tokens, hidden, generator=g),
        torch.randint(0, 16, (tokens, topk), generator=g),
        torch.rand(tokens, topk, generator=g),
    )


def test_doorbell_worker_runs_the_layers_experts_into_the_fixed_output():
    fns = {1: _experts(1), 4: _experts(4)}
    db = Doorbell(hidden=32, topk=2, tokens=3)
    addresses = [t.data_ptr() for t in (db.x, db.ids, db.w, db.out, db.flags)]
    worker = ExpertWorker(db, fns)
    try:
        for i in range(10):
            layer = (1, 4)[i % 2]
            x, ids, w = _inputs(i)
            got = StagedExperts(db, layer)(x, ids, w)
            assert torch.equal(got, fns[layer](x, ids, w)), f"call {i}, layer {layer}"
            assert torch.equal(db.out, got) and got.data_ptr() != db.out.data_ptr()  # a copy of the fixed buffer
        assert int(db.flags[REQUEST]) == int(db.flags[DONE]) == 10
        assert [t.data_ptr() for t in (db.x, db.ids, db.w, db.out, db.flags)] == addresses
    finally:
        worker.close()
    assert not worker.alive


def test_doorbell_answers_a_host_node_that_only_writes_the_flags():
    """The GPU's host node (kernels/cuda/doorbell.cu) writes the flags and spins, without the condition variable:
    the worker must find the request by polling the shared flags alone."""
    fn = _experts(9)
    db = Doorbell(hidden=32, topk=2, tokens=3)
    worker = ExpertWorker(db, {7: fn}, poll_s=1e-4)
    f = db.flags.numpy()
    try:
        for i in range(5):
            x, ids, w = _inputs(100 + i)
            db.x.copy_(x), db.ids.copy_(ids), db.w.copy_(w)
            f[LAYER] = 7
            seq = int(f[REQUEST]) + 1
            f[REQUEST] = seq  # what ring_and_wait does, then it spins on DONE
            deadline = time.monotonic() + 10
            while f[DONE] < seq:
                assert time.monotonic() < deadline, "the worker never answered a flags-only request"
                time.sleep(1e-4)
            assert torch.equal(db.out, fn(x, ids, w))
    finally:
        worker.close()


def test_doorbell_worker_failure_reaches_the_caller():
    def broken(x, ids, w):
        raise RuntimeError("engine exploded")

    db = Doorbell(hidden=32, topk=2, tokens=3)
    worker = ExpertWorker(db, {0: broken})
    with pytest.raises(DoorbellError, match="engine exploded"):
        StagedExperts(db, 0)(*_inputs(0))
    assert int(db.flags[ABORT]) == 1
    with pytest.raises(DoorbellError, match="engine exploded"):  # later steps fail at once, never hang
        db.ring(0)
    worker._thread.join(timeout=10)
    assert not worker.alive
    worker.close()


def test_doorbell_unknown_layer_and_closed_worker():
    db = Doorbell(hidden=32, topk=2, tokens=3)
    worker = ExpertWorker(db, {0: _experts(0)})
    with pytest.raises(DoorbellError, match="no routed experts registered for layer 3"):
        StagedExperts(db, 3)(*_inputs(0))
    worker.close()
    db2 = Doorbell(hidden=32, topk=2, tokens=1)
    w2 = ExpertWorker(db2, {0: _experts(0)})
    w2.close()
    with pytest.raises(DoorbellError, match="closed"):
        db2.ring(0)
    with pytest.raises(ValueError, match="stages 1 token"):
        StagedExperts(db2, 0)(*_inputs(0))


def test_doorbell_many_rings_from_another_thread():
    """Sequence numbers stay in step over many requests while the producer is not the main thread."""
    fn = _experts(2)
    db = Doorbell(hidden=32, topk=2, tokens=3)
    worker = ExpertWorker(db, {0: fn})
    errors: list[str] = []

    def producer() -> None:
        staged = StagedExperts(db, 0)
        for i in range(200):
            x, ids, w = _inputs(1000 + i)
            if not torch.equal(staged(x, ids, w), fn(x, ids, w)):
                errors.append(f"request {i}")

    t = threading.Thread(target=producer)
    t.start()
    t.join(timeout=120)
    worker.close()
    assert not t.is_alive() and not errors
    assert int(db.flags[REQUEST]) == int(db.flags[DONE]) == 200


# ------------------------------------------------------------------------------------------------ decode step (CPU)


def _prefill(model: DeepseekV3Model, cache) -> int:
    return int(model.forward(torch.tensor(PROMPT), 0, cache)[-1].argmax())


@pytest.mark.parametrize("engine", ["ref", "native"])
def test_static_decode_step_matches_eager_decode(gpu_pack, engine):
    """32 greedy steps: the graph-ready step (doorbell, fixed buffers) equals model.forward bit for bit."""
    pack = load_pack(gpu_pack, engine=engine)
    model = DeepseekV3Model(pack, static_kv=True)
    windowed = DeepseekV3Model(pack)
    c_eager, c_step, c_win = model.new_cache(CTX), model.new_cache(CTX), windowed.new_cache(CTX)
    tok = _prefill(model, c_eager)
    assert _prefill(model, c_step) == tok and _prefill(windowed, c_win) == tok
    step = DecodeStep(model, c_step)
    assert not step.use_graph  # CPU: the same body, run eagerly
    buffers = (step.x, step.pos, step.logits, c_step.c_kv, c_step.k_pe, step.doorbell.x, step.doorbell.out)
    fixed = [t.data_ptr() for t in buffers]
    n_moe = len(step.moes)
    assert n_moe > 0
    worst_windowed = 0.0
    try:
        for i in range(32):
            pos = len(PROMPT) + i
            want = model.forward(torch.tensor([tok]), pos, c_eager)
            got = step(tok, pos)
            assert got.data_ptr() == fixed[2]
            assert torch.equal(got, want), f"step {i}: max |diff| {(got - want).abs().max().item():.3g}"
            win = windowed.forward(torch.tensor([tok]), pos, c_win)
            worst_windowed = max(worst_windowed, (got - win).abs().max().item())
            tok = int(want[-1].argmax())
        assert torch.equal(c_step.c_kv, c_eager.c_kv) and torch.equal(c_step.k_pe, c_eager.k_pe)
        assert [t.data_ptr() for t in buffers] == fixed
        assert int(step.doorbell.flags[DONE]) == 32 * n_moe  # every MoE layer went through the doorbell
        for m in step.moes.values():  # the model's own experts are back in place
            assert not isinstance(m.experts, StagedExperts)
    finally:
        step.close()
    assert worst_windowed <= 1e-5, f"vs the windowed forward: {worst_windowed:.3g}"
    print(f"\n{engine}: 32 steps bit-identical; vs the windowed forward max |diff| {worst_windowed:.2e}")


def test_decode_step_needs_static_shapes(gpu_pack):
    pack = load_pack(gpu_pack)
    model = DeepseekV3Model(pack)
    with pytest.raises(ValueError, match="static_kv=True"):
        DecodeStep(model, model.new_cache(8))
    static = DeepseekV3Model(pack, static_kv=True)
    step = DecodeStep(static, static.new_cache(8))
    try:
        with pytest.raises(ValueError, match="position 8 does not fit"):
            step(1, 8)
    finally:
        step.close()


def test_kt_run_no_graph_flag_on_cpu(gpu_pack, tmp_path):
    """--no-graph is accepted and changes nothing on a CPU-only run (there is no graph to skip)."""
    from click.testing import CliRunner

    from ktpack.runtime.cli import main

    np.save(tmp_path / "ids.npy", np.array(PROMPT, dtype=np.int64))
    outs = []
    for extra in ([], ["--no-graph"]):
        stats = tmp_path / f"s{len(extra)}.json"
        args = [str(gpu_pack), "--prompt-ids", str(tmp_path / "ids.npy"), "--max-new-tokens", "6", "--temperature",
                "0", "--ignore-eos", "--ctx-size", str(CTX), "--stats-json", str(stats), *extra]  # fmt: skip
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0, r.output
        outs.append(json.loads(stats.read_text())["output_ids"])
    assert outs[0] == outs[1] and len(outs[0]) == 6


def _reference_marlin_gemm(x, qweight, scales, group_size, kernel="auto"):
    """Stand-in for cuda_ops.marlin_gemm: dequantize the packed tensors (layouts/marlin.py), then the CPU
    model's own products (F.linear / einsum), so a correctly placed model gives the same values."""
    from ktpack.layouts import marlin

    qw, sc = qweight.numpy(), scales.numpy()
    *lead, rows, n2 = qw.shape
    w = torch.from_numpy(np.ascontiguousarray(marlin.dequantize(qw, sc, (*lead, n2 // 2, rows * 16), group_size)))
    if lead:
        return torch.einsum("tmk,mnk->tmn", x, w)
    return torch.nn.functional.linear(x, w)


def test_place_on_device_reads_the_packed_marlin_tensors(gpu_pack, monkeypatch):
    """runtime/gpu.py on the CPU with a reference GEMM and float32 activations: every Marlin weight (2-D and the
    per-head stacks) is read from the pack's files as stored, everything else moves as it is, the routed experts
    sit behind HostExperts, and the logits (prefill and the decode step) equal the plain CPU model's."""
    from ktpack.runtime import gpu

    monkeypatch.setattr(gpu.cuda_ops, "marlin_gemm", _reference_marlin_gemm)
    pack = load_pack(gpu_pack)
    plain = DeepseekV3Model(pack, static_kv=True)
    placed = gpu.place_on_device(DeepseekV3Model(pack, static_kv=True), "cpu", act_dtype=torch.float32)
    attn = placed.blocks[0].attn
    assert isinstance(placed.head, gpu.MarlinLinear) and isinstance(attn.k_b, gpu.MarlinLinear)
    assert attn.k_b.qweight.dim() == 3 and isinstance(attn.q_a_norm, torch.Tensor)
    assert any(isinstance(b.ffn.experts, gpu.HostExperts) for b in placed.blocks if hasattr(b.ffn, "experts"))
    c_plain, c_placed = plain.new_cache(CTX), placed.new_cache(CTX)
    want = plain.forward(torch.tensor(PROMPT), 0, c_plain)
    got = placed.forward(torch.tensor(PROMPT), 0, c_placed)
    assert torch.equal(got, want), f"prefill: max |diff| {(got - want).abs().max().item():.3g}"
    step = DecodeStep(placed, c_placed)
    try:
        tok = int(want[-1].argmax())
        for i in range(4):
            pos = len(PROMPT) + i
            want = plain.forward(torch.tensor([tok]), pos, c_plain)
            assert torch.equal(step(tok, pos), want), f"step {i}"
            tok = int(want[-1].argmax())
    finally:
        step.close()


def test_place_on_device_refuses_a_cpu_target_pack(tmp_path_factory, tiny_dir, monkeypatch):
    from ktpack.runtime import gpu

    monkeypatch.setattr(gpu.cuda_ops, "marlin_gemm", _reference_marlin_gemm)
    folder = session_packs(tmp_path_factory, tiny_dir)("tiny-Q8_0.gguf", target="cpu")
    with pytest.raises(ValueError, match="is a CPU linear .* --target gpu"):
        gpu.place_on_device(DeepseekV3Model(load_pack(folder), static_kv=True), "cpu")


# ------------------------------------------------------------------------------------------------ on a GPU


@pytest.mark.gpu
@needs_gpu
def test_graph_replay_matches_eager_decode_on_gpu(gpu_pack):
    """64 greedy steps on the GPU (Marlin GEMMs, CPU experts through the doorbell): the replayed CUDA Graph
    gives the same logits as the same step run eagerly."""
    from ktpack.runtime.gpu import MarlinLinear, place_on_device

    pack = load_pack(gpu_pack, engine="native")
    model = place_on_device(DeepseekV3Model(pack, static_kv=True), "cuda")
    assert isinstance(model.head, MarlinLinear)
    c_graph, c_eager = model.new_cache(96), model.new_cache(96)
    tok = _prefill(model, c_graph)
    assert _prefill(model, c_eager) == tok
    graph, eager = DecodeStep(model, c_graph, graph=True), DecodeStep(model, c_eager, graph=False)
    assert graph.use_graph and not eager.use_graph
    try:
        for i in range(64):
            pos = len(PROMPT) + i
            a = graph(tok, pos).cpu()
            b = eager(tok, pos).cpu()
            assert torch.equal(a, b), f"step {i}: max |diff| {(a - b).abs().max().item():.3g}"
            tok = int(a[-1].argmax())
        assert graph.graph is not None
        assert torch.equal(c_graph.c_kv, c_eager.c_kv)
    finally:
        graph.close()
        eager.close()


@pytest.mark.gpu
@needs_gpu
def test_engine_on_gpu_graph_and_no_graph_agree(gpu_pack):
    from ktpack.runtime.engine import Engine
    from ktpack.runtime.sampling import SamplingParams

    outs = []
    for graph in (True, False):
        eng = Engine(gpu_pack, ctx_size=CTX, device="cuda", graph=graph)
        gen = eng.generate(PROMPT, SamplingParams(temperature=0), max_new_tokens=24, ignore_eos=True)
        outs.append(gen.output_ids)
        eng._step.close()
    assert outs[0] == outs[1]
