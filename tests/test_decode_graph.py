"""The graph-ready decode step (runtime/graph.py) and the CPU-expert doorbell (runtime/doorbell.py).

On the CPU the decode step runs eagerly the exact code a GPU captures into one CUDA Graph: fixed-address
input, position and logits buffers, the static KV cache, and every MoE layer's routed experts reached through
the doorbell's staging buffers and worker thread, with the shared expert computed between the start and the
wait (it overlaps the CPU experts). So it must give the eager `model.forward` (static cache) bit for bit.
Against the default windowed forward (attention over positions 0..pos only) the values agree to float32
reduction order: the softmax and the attention sums run over a longer, zero-weighted tail. The compiled host
nodes (kernels/cuda/doorbell.cu, built as a host library with nvcc) run against the Python worker (ctypes).
runtime/gpu.py's placement runs here too, on the CPU with a reference stand-in for the Marlin GEMM.
On a GPU: the graph replay against the same step run eagerly, and kt-run's --no-graph against the graph.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from oracle import session_packs

from ktpack.runtime.doorbell import (
    ABORT,
    DONE,
    LAYER,
    N_FLAGS,
    REQUEST,
    STALL_NS,
    START_NS,
    WAITS,
    Doorbell,
    DoorbellError,
    ExpertWorker,
    StagedExperts,
)
from ktpack.runtime.graph import DecodeStep, OverlappedMoE
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
    """The GPU's host nodes (kernels/cuda/doorbell.cu) write the flags and spin, without the condition variable:
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
            f[REQUEST] = seq  # what the start node does; the wait node spins on DONE
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


def test_doorbell_ring_start_returns_before_the_experts_finish():
    """ring_start publishes and returns; work done before ring_wait overlaps the worker's call."""
    release = threading.Event()
    fn = _experts(3)

    def slow(x, ids, w):
        assert release.wait(30), "the producer never got past ring_start"
        return fn(x, ids, w)

    db = Doorbell(hidden=32, topk=2, tokens=3)
    worker = ExpertWorker(db, {2: slow})
    try:
        x, ids, w = _inputs(5)
        staged = StagedExperts(db, 2)
        staged.start(x, ids, w)
        assert int(db.flags[REQUEST]) == 1 and int(db.flags[DONE]) == 0  # started, not done
        release.set()  # "the shared expert" runs here, while the worker waits for it
        assert torch.equal(staged.finish(torch.device("cpu")), fn(x, ids, w))
        assert db.stall()[1] == 1 and worker.stats.requests == 1
    finally:
        worker.close()


def test_doorbell_flag_slots_match_the_cuda_header():
    """runtime/doorbell.py and kernels/cuda/doorbell.h name the same int64 slots."""
    import re

    from ktpack.runtime import doorbell

    header = (Path(__file__).resolve().parent.parent / "kernels" / "cuda" / "doorbell.h").read_text()
    assert int(re.search(r"kDoorbellFlags = (\d+);", header).group(1)) == doorbell.N_FLAGS
    slots = {m.group(1): int(m.group(2)) for m in re.finditer(r"\bk([A-Z][A-Za-z]+) = (\d+),", header)}
    py = {"Request": REQUEST, "Done": DONE, "Abort": ABORT, "Layer": LAYER, "StartNs": START_NS,
          "StallNs": STALL_NS, "Waits": WAITS}  # fmt: skip
    assert slots == py


def _build_host_doorbell(tmp_path: Path) -> ctypes.CDLL:
    nvcc = shutil.which("nvcc") or (os.environ.get("CUDA_HOME") and f"{os.environ['CUDA_HOME']}/bin/nvcc")
    if not nvcc or not Path(nvcc).exists():
        pytest.skip("nvcc not found (no CUDA toolkit on this machine)")
    src = Path(__file__).resolve().parent.parent / "kernels" / "cuda" / "doorbell.cu"
    lib = tmp_path / "libktdoorbell.so"
    cmd = [nvcc, "-shared", "-Xcompiler", "-fPIC", "-std=c++20", "-O2", "-o", str(lib), str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
    so = ctypes.CDLL(str(lib))
    so.ktpack_doorbell_start_now.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    so.ktpack_doorbell_wait_now.argtypes = [ctypes.c_void_p]
    return so


def test_compiled_host_nodes_against_the_python_worker(tmp_path):
    """doorbell.cu's start and wait host functions (the code a GPU stream runs), called on this thread through
    ctypes (which lets go of the GIL while they spin) against the Python ExpertWorker: results in `out`, the
    sequence numbers, the stall counters, and START_NS on the clock the worker reads (time.monotonic_ns)."""
    so = _build_host_doorbell(tmp_path)
    fns = {3: _experts(3), 8: _experts(8)}
    db = Doorbell(hidden=32, topk=2, tokens=3)
    assert db.flags.numel() == N_FLAGS == 8
    ptr = ctypes.c_void_p(db.flags.data_ptr())
    worker = ExpertWorker(db, fns, poll_s=1e-4)
    t_begin = time.monotonic_ns()
    try:
        for i in range(20):
            layer = (3, 8)[i % 2]
            x, ids, w = _inputs(300 + i)
            db.x.copy_(x), db.ids.copy_(ids), db.w.copy_(w)
            so.ktpack_doorbell_start_now(ptr, layer)
            assert int(db.flags[LAYER]) == layer and t_begin <= int(db.flags[START_NS]) <= time.monotonic_ns()
            so.ktpack_doorbell_wait_now(ptr)
            assert int(db.flags[DONE]) == int(db.flags[REQUEST]) == i + 1
            assert torch.equal(db.out, fns[layer](x, ids, w)), f"request {i}"
    finally:
        worker.close()
    elapsed = time.monotonic_ns() - t_begin
    h = worker.stats
    assert h.requests == 20 and int(db.flags[WAITS]) == 20
    assert 0 < h.handoff_ns <= elapsed and 0 <= h.pickup_ns <= h.handoff_ns  # one clock on both sides
    assert 0 < int(db.flags[STALL_NS]) <= elapsed


def test_compiled_wait_node_returns_when_the_worker_fails(tmp_path):
    so = _build_host_doorbell(tmp_path)

    def broken(x, ids, w):
        raise RuntimeError("engine exploded")

    db = Doorbell(hidden=32, topk=2, tokens=3)
    ptr = ctypes.c_void_p(db.flags.data_ptr())
    worker = ExpertWorker(db, {0: broken}, poll_s=1e-4)

    def node() -> None:
        so.ktpack_doorbell_start_now(ptr, 0)
        so.ktpack_doorbell_wait_now(ptr)

    t = threading.Thread(target=node)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive(), "the compiled wait node kept spinning after the worker failed"
    assert int(db.flags[ABORT]) == 1 and "engine exploded" in repr(db.error)
    so.ktpack_doorbell_start_now(ptr, 0)  # later start nodes see ABORT and publish nothing
    assert int(db.flags[REQUEST]) == 1
    worker.close()


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
        assert all(isinstance(o, OverlappedMoE) and o.overlap for o in step.overlapped.values())
        h = step.handoffs
        assert h.requests == 32 * n_moe and step.doorbell.stall()[1] == 32 * n_moe
        assert 0 <= h.pickup_ns <= h.handoff_ns and 0 < h.compute_ns <= h.handoff_ns
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


def test_prefill_stays_outside_the_step(gpu_pack):
    """Chunked prefill (Engine._prefill: model.forward over chunks) is not the step: with a step built, a
    prefill chunk runs the model's own MoE (experts called directly, no doorbell); only step calls ring it."""
    model = DeepseekV3Model(load_pack(gpu_pack), static_kv=True)
    cache = model.new_cache(CTX)
    step = DecodeStep(model, cache)
    try:
        tok = _prefill(model, cache)
        assert int(step.doorbell.flags[REQUEST]) == 0 and step.handoffs.requests == 0
        assert not any(isinstance(b.ffn, OverlappedMoE) for b in model.blocks)
        step(tok, len(PROMPT))
        assert int(step.doorbell.flags[REQUEST]) == len(step.moes)
        logits = model.forward(torch.tensor([tok, 3, 4]), len(PROMPT) + 1, cache)  # a later chunk
        assert logits.shape[0] == 3 and int(step.doorbell.flags[REQUEST]) == len(step.moes)
    finally:
        step.close()


def _gate(model: DeepseekV3Model, timeout: float) -> list[str]:
    """Block every MoE layer's routed experts until that layer's shared expert has started: a step whose shared
    expert ran only after the routed experts finished would stall (and fail). Returns the call log. (Before
    the decode step is made: its worker takes the experts then. Not for model.forward: MoE runs them in turn.)"""
    log: list[str] = []
    for i, b in enumerate(model.blocks):
        m = getattr(b, "ffn", None)
        if not hasattr(m, "shared") or m.shared is None:
            continue
        started = threading.Event()

        def shared(x, _inner=m.shared, _ev=started, _i=i):
            log.append(f"shared {_i}")
            _ev.set()
            return _inner(x)

        def experts(x, ids, w, _inner=m.experts, _ev=started, _i=i):
            if not _ev.wait(timeout):
                raise TimeoutError(f"layer {_i}: the shared expert did not run while the routed experts waited")
            _ev.clear()
            log.append(f"routed {_i}")
            return _inner(x, ids, w)

        m.shared, m.experts = shared, experts
    return log


def test_decode_step_overlaps_the_shared_expert_with_the_cpu_experts(gpu_pack):
    """In the step, the routed experts start (doorbell) before the shared expert runs and are waited for after:
    the CPU experts here cannot finish until the shared expert has started, and the values are unchanged."""
    model = DeepseekV3Model(load_pack(gpu_pack), static_kv=True)
    plain = DeepseekV3Model(load_pack(gpu_pack), static_kv=True)
    c_step, c_plain = model.new_cache(CTX), plain.new_cache(CTX)
    tok = _prefill(model, c_step)
    assert _prefill(plain, c_plain) == tok
    log = _gate(model, timeout=30)
    step = DecodeStep(model, c_step)
    n_moe = len(step.moes)
    try:
        for i in range(3):
            log.clear()
            want = plain.forward(torch.tensor([tok]), len(PROMPT) + i, c_plain)
            assert torch.equal(step(tok, len(PROMPT) + i), want), f"step {i}"
            tok = int(want[-1].argmax())
        assert len(log) == 2 * n_moe and all(a.startswith("shared") for a in log[::2])
    finally:
        step.close()


def test_gated_experts_catch_a_step_without_overlap(gpu_pack):
    """The control: the same gate fails when the shared expert runs after the wait (overlap=False)."""
    model = DeepseekV3Model(load_pack(gpu_pack), static_kv=True)
    cache = model.new_cache(CTX)
    tok = _prefill(model, cache)
    _gate(model, timeout=0.5)
    step = DecodeStep(model, cache)
    for o in step.overlapped.values():
        o.overlap = False
    try:
        with pytest.raises(DoorbellError, match="did not run while the routed experts waited"):
            step(tok, len(PROMPT))
    finally:
        step.close()


def test_decode_step_does_not_overlap_two_native_pool_jobs(tmp_path_factory, tiny_dir):
    """A CPU pack's shared expert runs on the native engine's pool, which takes one job at a time: on a CPU the
    step then runs it after the wait (on a GPU it is a GPU kernel and always overlaps)."""
    from ktpack.runtime.graph import uses_native_pool

    folder = session_packs(tmp_path_factory, tiny_dir)("tiny-Q8_0.gguf", target="cpu")
    pack = load_pack(folder, engine="native")
    model = DeepseekV3Model(pack, static_kv=True)
    c_step, c_eager = model.new_cache(CTX), model.new_cache(CTX)
    tok = _prefill(model, c_step)
    assert _prefill(model, c_eager) == tok
    step = DecodeStep(model, c_step)
    try:
        shared = [m.shared for m in step.moes.values() if m.shared is not None]
        assert shared and all(uses_native_pool(s) for s in shared)
        assert not any(o.overlap for o in step.overlapped.values())
        for i in range(4):
            want = model.forward(torch.tensor([tok]), len(PROMPT) + i, c_eager)
            assert torch.equal(step(tok, len(PROMPT) + i), want), f"step {i}"
            tok = int(want[-1].argmax())
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


BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench_gpu.py"


def test_bench_gpu_without_cuda_exits_2(gpu_pack):
    from ktpack.runtime import cuda_ops

    why = cuda_ops.why_unavailable()
    if why is None:
        pytest.skip("this machine has CUDA")
    r = subprocess.run([sys.executable, str(BENCH), str(gpu_pack)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [f"bench_gpu: CUDA unavailable: {why}"]


def test_bench_gpu_dry_run_on_the_cpu(gpu_pack, tmp_path):
    """scripts/bench_gpu.py's measuring code on the CPU (eager only): one table, JSON with the hand-offs the
    worker measured (one per MoE layer per token, request -> done = pick-up + experts)."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH), str(gpu_pack), "--device", "cpu", "--tokens", "4", "--warmup", "1",
           "--prompt-len", "3", "--reps", "2", "--ctx-size", "16", "--engine", "ref", "--json", str(out)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1].split()[:2] == ["mode", "tok/s"] and lines[2].startswith("eager ")
    doc = json.loads(out.read_text())
    (row,) = doc["rows"]
    n_moe = row["moe_layers"]
    assert n_moe > 0 and row["handoffs_per_token"] == n_moe and row["reps"] == 2
    assert row["tok_s"] > 0 and 0 < row["experts_ms_per_token"] <= row["handoff_ms_per_token"]
    assert row["handoff_ms_per_token"] <= row["ms_per_token"] and row["stall_ms_per_token"] > 0
    assert len(doc["tokens"]["eager"]) == 1 + 1 + 4 and doc["graph_eager_agree"] is None
    bad = subprocess.run([*cmd[:3], "--device", "cpu", "--ctx-size", "8"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip().startswith("bench_gpu: error: --ctx-size 8 is shorter")


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


@pytest.mark.gpu
@needs_gpu
def test_bench_gpu_on_gpu(gpu_pack, tmp_path):
    """scripts/bench_gpu.py on the tiny pack: both modes measured, graph and eager greedy tokens agree."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH), str(gpu_pack), "--tokens", "16", "--prompt-len", "5", "--reps", "2",
           "--ctx-size", "64", "--json", str(out)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    print("\n" + r.stdout)
    doc = json.loads(out.read_text())
    assert [row["mode"] for row in doc["rows"]] == ["eager", "graph"] and doc["graph_eager_agree"] is True
    assert all(row["handoffs_per_token"] == row["moe_layers"] > 0 for row in doc["rows"])


def _bf16_marlin_gemm(x, qweight, scales, group_size, kernel="auto"):
    """The arithmetic the CUDA kernel defines, on the CPU: x rounded to bf16, exact products with the
    dequantized int4 weight, the sums in float64 (the kernel's are fp32: the only difference), y rounded to
    bf16 (the kernel's output dtype)."""
    from ktpack.layouts import marlin

    qw, sc = qweight.cpu().numpy(), scales.cpu().numpy()
    *lead, rows, n2 = qw.shape
    w = marlin.dequantize(qw, sc, (*lead, n2 // 2, rows * 16), group_size)
    w = torch.from_numpy(np.ascontiguousarray(w)).double()
    xb = x.to(torch.bfloat16).double()
    y = torch.einsum("tmk,mnk->tmn", xb, w) if lead else xb @ w.T
    return y.to(torch.bfloat16)


@pytest.mark.gpu
@needs_gpu
def test_gpu_logits_match_transformers_on_the_packs_weights(gpu_pack, tiny_dir, monkeypatch):
    """The placed model on the GPU (Marlin kernels, bf16 activations, CPU experts) against transformers run
    on exactly the weights the pack holds (the int4 GPU side dequantized). The one deliberate difference is
    the bf16 rounding of each Marlin GEMM's input and output; its size is measured in the same test by the
    CPU placement with `_bf16_marlin_gemm` standing in for the kernel (tiny model, 48 positions: a median
    per-position max |diff| of 0.022, and 2 positions near 0.7 where the rounding flipped a routed expert).
    The GPU may differ from that simulation only by fp32 summation order, which moves an output's bf16
    rounding by at most one step, an error of the rounding's own size: so its typical position is within
    twice the simulation's, and routing flips stay rare (at most twice the simulation's count, or 4)."""
    from oracle import hf_logits, oracle_for

    from ktpack.runtime import gpu

    ids = torch.randint(0, 4096, (48,), generator=torch.Generator().manual_seed(1234))
    want = hf_logits(oracle_for(tiny_dir, gpu_pack), ids)
    pack = load_pack(gpu_pack, engine="native")

    monkeypatch.setattr(gpu.cuda_ops, "marlin_gemm", _bf16_marlin_gemm)
    sim = gpu.place_on_device(DeepseekV3Model(pack, static_kv=True), "cpu")
    with torch.inference_mode():
        simulated = sim.forward(ids, 0, sim.new_cache(CTX))
    monkeypatch.undo()
    on_gpu = gpu.place_on_device(DeepseekV3Model(pack, static_kv=True), "cuda")
    with torch.inference_mode():
        got = on_gpu.forward(ids, 0, on_gpu.new_cache(CTX)).cpu()

    e_sim, e_gpu = (simulated - want).abs().amax(-1), (got - want).abs().amax(-1)
    m_sim, m_gpu = e_sim.median().item(), e_gpu.median().item()
    flips_sim, flips_gpu = int((e_sim > 10 * m_sim).sum()), int((e_gpu > 10 * m_sim).sum())
    top1 = int((got.argmax(-1) == want.argmax(-1)).sum())
    print(f"\nvs transformers on the pack's weights, per-position max |diff|: GPU median {m_gpu:.3g} max "
          f"{e_gpu.max().item():.3g} ({flips_gpu} flips), bf16 CPU simulation median {m_sim:.3g} max "
          f"{e_sim.max().item():.3g} ({flips_sim} flips); GPU vs simulation max "
          f"{(got - simulated).abs().max().item():.3g}; top-1 equal {top1}/{len(ids)}")  # fmt: skip
    assert 0 < m_sim and m_gpu <= 2 * m_sim
    assert flips_gpu <= max(4, 2 * flips_sim)
