"""GPU memory at run time (runtime/gpu.py): the weights checked against the free memory before they are placed,
the KV cache sized from what is left, kt-run's --gpu-mem, and one-line refusals instead of CUDA OOM tracebacks.

Without a GPU: the sizing arithmetic (`size_kv_cache`, a pure function) against hand computations at R1's
dimensions and against a real KVCache's bytes; `device_bytes` against what `place_on_device` actually holds;
`place_for_run` on the CPU with a stand-in for torch.cuda.mem_get_info; kt-run's refusals with CUDA's memory
query and kernel build mocked (the refusals come before anything touches a device). On a GPU (marked gpu):
the same measured for real.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from oracle import session_packs

from ktpack.layouts.config import ModelConfig
from ktpack.runtime import gpu
from ktpack.runtime.model import DeepseekV3Model, KVCache
from ktpack.runtime.weights import load_pack

GIB = 1 << 30
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with a CUDA build of torch")

R1 = ModelConfig(
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
    num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
    first_k_dense_replace=3, routed_scaling_factor=2.5, norm_topk_prob=True, scoring_func="sigmoid",
    topk_method="noaux_tc", rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=163840,
)  # fmt: skip

# R1 by hand: per cache position 61 layers x (512 + 64) x 4 B of float32 cache + cos/sin row 64 x 4 B + 8 B
R1_CACHE_PP = 61 * 576 * 4 + 256 + 8  # 140,808
R1_PREFILL_PP_256 = 4 * 256 * 128 * 4  # 4 live [256, 128, ctx] float32 score tensors: 524,288
# per prefill token: logits 129280 + q 2*128*192 + 3*128*512 + o 128*128 + 3*18432 + 8*7168 floats
R1_RESERVE_256 = (768 << 20) + 256 * 4 * (129280 + 49152 + 196608 + 16384 + 55296 + 57344)  # 1,321,467,904


@pytest.fixture(scope="module")
def gpu_pack(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    return session_packs(tmp_path_factory, tiny_dir)("tiny-F32.gguf", target="gpu")


# ------------------------------------------------------------------------------------------------ arithmetic


def test_r1_sizing_by_hand():
    assert gpu.kv_cache_bytes_per_position(R1) == R1_CACHE_PP == 140_808
    assert gpu.prefill_bytes_per_position(R1, 256) == R1_PREFILL_PP_256
    assert gpu.activation_reserve(R1, 256) == R1_RESERVE_256 == 1_321_467_904
    # 40 GiB left after the weights: (42,949,672,960 - 1,321,467,904) // (140,808 + 524,288) = 62,589
    kv = gpu.size_kv_cache(40 * GIB, R1, 0, 256)
    assert kv.max_ctx == kv.ctx_size == 62_589
    assert kv.cache_bytes == 62_589 * 140_808 and kv.prefill_bytes == 62_589 * 524_288
    assert kv.reserve + kv.ctx_size * kv.per_position <= 40 * GIB < kv.reserve + (kv.ctx_size + 1) * kv.per_position
    # a smaller prefill chunk leaves more room for the cache: 64 tokens -> 4 x 64 x 128 x 4 = 131,072 B/position,
    # reserve (768 << 20) + 64 x 2,016,256 = 934,346,752: (42,949,672,960 - 934,346,752) // 271,880 = 154,536
    assert gpu.size_kv_cache(40 * GIB, R1, 0, 64).max_ctx == 154_536
    # the whole 163,840 positions need 163,840 x 665,096 B + the reserve = 102.72 GiB: capped at that on 139 GiB
    assert gpu.size_kv_cache(139 * GIB, R1, 0, 256).ctx_size == 163_840


def test_requested_context_at_the_boundary():
    per = R1_CACHE_PP + R1_PREFILL_PP_256
    avail = R1_RESERVE_256 + 10_000 * per
    assert gpu.size_kv_cache(avail, R1, 10_000, 256).ctx_size == 10_000
    with pytest.raises(gpu.GpuMemoryError) as e:
        gpu.size_kv_cache(avail - 1, R1, 10_000, 256)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("--ctx-size 10,000 does not fit the GPU: ")
    for figure in ("room for 9,999 positions of 665,096 B", "61 layers x (512 + 64) x 4 B", "= 140,808 B",
                   "4 x 256 tokens x 128 heads x 4 B = 524,288 B", "use --ctx-size 9999 or less"):  # fmt: skip
        assert figure in msg, msg


def test_short_context_counts_a_shorter_prefill_chunk():
    """A prompt is at most --ctx-size tokens, so a context shorter than the chunk needs only that many rows."""
    kv = gpu.size_kv_cache(8 * GIB, R1, 100, 256)
    assert kv.prefill_chunk == 100 and kv.prefill_per_position == 4 * 100 * 128 * 4
    assert kv.reserve == gpu.activation_reserve(R1, 100)


def test_no_room_at_all_and_bad_arguments():
    with pytest.raises(gpu.GpuMemoryError, match=r"^no room for a KV cache on the GPU: .* room for 0 positions"):
        gpu.size_kv_cache(R1_RESERVE_256, R1, 0, 256)
    with pytest.raises(gpu.GpuMemoryError, match="does not fit the GPU: .*; free GPU memory, or a smaller"):
        gpu.size_kv_cache(-5 * GIB, R1, 4096, 256)
    with pytest.raises(ValueError, match="--ctx-size must be >= 0"):
        gpu.size_kv_cache(GIB, R1, -1, 256)
    with pytest.raises(ValueError, match="--prefill-chunk must be >= 1"):
        gpu.size_kv_cache(GIB, R1, 16, 0)


def test_per_position_bytes_match_a_real_cache(gpu_pack):
    cfg = load_pack(gpu_pack).config
    ctx = 37
    c = KVCache(cfg, ctx)
    held = sum(t.numel() * t.element_size() for t in (c.c_kv, c.k_pe, c.rope.cos, c.rope.sin, c.positions))
    assert held == ctx * gpu.kv_cache_bytes_per_position(cfg)
    assert c.c_kv.element_size() == gpu.KV_DTYPE_BYTES


# ------------------------------------------------------------------------------------------------ weights


def _held_bytes(model: DeepseekV3Model) -> int:
    """What a placed model holds for the device: MarlinLinear qweight + scales, other tensors, each once."""
    seen: set[int] = set()
    total = 0

    def count(obj: object, skip: tuple[str, ...] = ()) -> None:
        nonlocal total
        for key, v in vars(obj).items():
            if key in skip or id(v) in seen:
                continue
            if isinstance(v, gpu.MarlinLinear):
                seen.add(id(v))
                total += v.qweight.nbytes + v.scales.nbytes
            elif isinstance(v, torch.Tensor):
                seen.add(id(v))
                total += v.nbytes

    count(model)
    for b in model.blocks:
        count(b, ("attn", "ffn"))
        count(b.attn, ("model",))
        for part in (getattr(b.ffn, "router", None), getattr(b.ffn, "shared", None)):
            if part is not None:
                count(part)
        if not hasattr(b.ffn, "router"):
            count(b.ffn)
    return total


def test_device_bytes_is_what_placement_holds(gpu_pack):
    model = DeepseekV3Model(load_pack(gpu_pack), static_kv=True)
    predicted = gpu.device_bytes(model)
    gpu.place_on_device(model, "cpu", act_dtype=torch.float32)
    assert isinstance(model.head, gpu.MarlinLinear)
    assert predicted == _held_bytes(model) > 0
    assert gpu.recorded_gpu_bytes(model.pack) > 0


class FakeMem:
    """torch.cuda.mem_get_info stand-in: successive (free, total) readings (the last one repeats)."""

    def __init__(self, *free: int, total: int = 80 * GIB) -> None:
        self.free = list(free)
        self.total = total
        self.calls = 0

    def __call__(self) -> tuple[int, int]:
        v = self.free[min(self.calls, len(self.free) - 1)]
        self.calls += 1
        return v, self.total


def _fresh(gpu_pack: Path) -> tuple[DeepseekV3Model, int, int]:
    model = DeepseekV3Model(load_pack(gpu_pack), static_kv=True)
    cfg = model.config
    per = gpu.kv_cache_bytes_per_position(cfg) + gpu.prefill_bytes_per_position(cfg, 16)
    return model, gpu.device_bytes(model), per


def _placed(model: DeepseekV3Model) -> bool:
    return isinstance(model.head, gpu.MarlinLinear)


def test_place_for_run_fits(gpu_pack):
    model, weights, per = _fresh(gpu_pack)
    reserve = gpu.activation_reserve(model.config, 16)
    free0 = weights + reserve + 100 * per + per - 1
    mem = FakeMem(free0, free0 - weights)  # the second reading: after the weights went to the device
    budget = gpu.place_for_run(model, "cpu", 64, 16, mem_info=mem)
    assert _placed(model) and mem.calls == 2
    assert budget.kv.ctx_size == 64 and budget.kv.max_ctx == 100 and budget.weights == weights
    assert budget.free_at_start == free0 and budget.free_after_weights == free0 - weights
    line = budget.line()
    assert "\n" not in line and "KV cache 64 positions" in line and "--ctx-size 100" in line
    assert budget.as_dict()["kv"]["ctx_size"] == 64


def test_place_for_run_context_zero_takes_what_is_left(gpu_pack):
    model, weights, per = _fresh(gpu_pack)
    cfg = model.config
    reserve = gpu.activation_reserve(cfg, 16)
    free0 = weights + reserve + 50 * per
    budget = gpu.place_for_run(model, "cpu", 0, 16, mem_info=FakeMem(free0, free0 - weights))
    assert budget.kv.ctx_size == 50 < cfg.max_position_embeddings
    model2, _, _ = _fresh(gpu_pack)  # plenty of memory: capped at the model's positions
    big = gpu.place_for_run(model2, "cpu", 0, 16, mem_info=FakeMem(80 * GIB, 80 * GIB - weights))
    assert big.kv.ctx_size == cfg.max_position_embeddings < big.kv.max_ctx


def test_weights_that_do_not_fit_are_refused_before_placing(gpu_pack):
    model, weights, _ = _fresh(gpu_pack)
    mem = FakeMem(weights - 1, total=24 * GIB)
    with pytest.raises(gpu.GpuMemoryError) as e:
        gpu.place_for_run(model, "cpu", 64, 16, mem_info=mem)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("the pack's GPU side does not fit: its weights take ")
    assert "the manifest records" in msg and "cpu has" in msg and "free of 24.00 GiB" in msg
    assert not _placed(model) and mem.calls == 1


def test_gpu_mem_limit_is_the_whole_run(gpu_pack):
    """--gpu-mem caps weights + cache + reserve even when the device has more free."""
    model, weights, per = _fresh(gpu_pack)
    reserve = gpu.activation_reserve(model.config, 16)
    limit = weights + reserve + 20 * per
    with pytest.raises(gpu.GpuMemoryError, match=r"but kt-run --gpu-mem is [\d.]+ GiB$"):
        gpu.place_for_run(model, "cpu", 0, 16, gpu_mem=(weights + reserve - 1) / GIB, mem_info=FakeMem(80 * GIB))
    assert not _placed(model)
    with pytest.raises(gpu.GpuMemoryError, match="--ctx-size 64 does not fit the GPU: .* room for 20 positions"):
        gpu.place_for_run(model, "cpu", 64, 16, gpu_mem=limit / GIB, mem_info=FakeMem(80 * GIB))
    assert not _placed(model)  # the requested context is checked before the weights move
    budget = gpu.place_for_run(model, "cpu", 0, 16, gpu_mem=limit / GIB, mem_info=FakeMem(80 * GIB, 80 * GIB - weights))
    assert budget.kv.ctx_size == 20 and budget.limit == int(limit / GIB * GIB)
    with pytest.raises(ValueError, match="--gpu-mem must be > 0"):
        gpu.place_for_run(model, "cpu", 0, 16, gpu_mem=0)


def test_memory_taken_meanwhile_is_measured(gpu_pack):
    """The cache is sized from the second reading: if another process took memory while the weights moved,
    the requested context is refused with the measured numbers (after placing, still one line)."""
    model, weights, per = _fresh(gpu_pack)
    reserve = gpu.activation_reserve(model.config, 16)
    free0 = weights + reserve + 100 * per
    mem = FakeMem(free0, free0 - weights - 60 * per)
    with pytest.raises(gpu.GpuMemoryError, match="--ctx-size 64 does not fit the GPU: .* room for 40 positions"):
        gpu.place_for_run(model, "cpu", 64, 16, mem_info=mem)
    assert mem.calls == 2


def test_cpu_target_pack_is_refused_before_measuring_anything_else(tmp_path_factory, tiny_dir):
    folder = session_packs(tmp_path_factory, tiny_dir)("tiny-Q8_0.gguf", target="cpu")
    model = DeepseekV3Model(load_pack(folder), static_kv=True)
    with pytest.raises(ValueError, match="is a CPU linear .* --target gpu"):
        gpu.place_for_run(model, "cpu", 64, 16, mem_info=FakeMem(80 * GIB))


# ------------------------------------------------------------------------------------------------ kt-run


def _kt_run(gpu_pack: Path, tmp_path: Path, *extra: str):
    from click.testing import CliRunner

    from ktpack.runtime.cli import main

    np.save(tmp_path / "ids.npy", np.array([5, 17, 300], dtype=np.int64))
    args = [str(gpu_pack), "--prompt-ids", str(tmp_path / "ids.npy"), "--max-new-tokens", "2", *extra]
    return CliRunner().invoke(main, args)


@pytest.fixture
def mocked_cuda(monkeypatch):
    """KTPACK_DEVICE=cuda with the kernel build and the memory query mocked: enough to reach the refusals,
    which come before any tensor goes to the device."""
    from ktpack.runtime import cuda_ops

    monkeypatch.setenv("KTPACK_DEVICE", "cuda")
    monkeypatch.setattr(cuda_ops, "load", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (6 * GIB, 24 * GIB))


def test_kt_run_refuses_a_context_that_does_not_fit(gpu_pack, tmp_path, mocked_cuda):
    r = _kt_run(gpu_pack, tmp_path, "--ctx-size", "100000000")
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kt-run: error: --ctx-size 100,000,000 does not fit the GPU: ")
    assert "GiB left after the weights" in lines[0] and "use --ctx-size" in lines[0]
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_kt_run_gpu_mem_limit(gpu_pack, tmp_path, mocked_cuda):
    r = _kt_run(gpu_pack, tmp_path, "--ctx-size", "64", "--gpu-mem", "0.01")
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kt-run: error: the pack's GPU side does not fit: ")
    assert lines[0].endswith("but kt-run --gpu-mem is 0.01 GiB")


def test_kt_run_without_cuda_says_why(gpu_pack, tmp_path, monkeypatch):
    from ktpack.runtime import cuda_ops

    if cuda_ops.why_unavailable() is None:
        pytest.skip("this machine can build the CUDA kernels")
    monkeypatch.setenv("KTPACK_DEVICE", "cuda")
    r = _kt_run(gpu_pack, tmp_path, "--ctx-size", "64")
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kt-run: error: ktpack CUDA kernels unavailable: "), r.output


def test_ctx_size_zero_is_for_gpu_runs(gpu_pack):
    from ktpack.runtime.engine import Engine, EngineError

    with pytest.raises(EngineError, match="--ctx-size must be >= 1 .*GPU runs only"):
        Engine(gpu_pack, ctx_size=0, device="cpu")


# ------------------------------------------------------------------------------------------------ on a GPU


@pytest.mark.gpu
@needs_gpu
def test_budget_on_a_real_gpu(gpu_pack):
    """The weights' measured footprint is device_bytes (plus allocator rounding), the cache allocates what the
    sizing counted, --ctx-size 0 takes the model's positions here (a tiny model), and an impossible context is
    one GpuMemoryError, not a CUDA out-of-memory error."""
    from ktpack.runtime.engine import Engine

    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    eng = Engine(gpu_pack, ctx_size=0, device="cuda", prefill_chunk=64)
    try:
        b = eng.gpu_budget
        # What the engine holds: the weights, the cache, and its step's fixed buffers, which the activation
        # reserve must cover. (mem_get_info sees only new allocator segments: on the H200, after the other
        # GPU tests in the same process, the tiny model's 2 MB of weights fitted into cached ones.)
        held = torch.cuda.memory_allocated() - before
        assert b.weights + b.kv.cache_bytes <= held <= b.weights + b.kv.cache_bytes + b.kv.reserve
        assert b.free_at_start - b.free_after_weights <= b.weights + 64 * (2 << 20)  # 2 MiB segment rounding
        assert eng.ctx_size == b.kv.ctx_size == eng.config.max_position_embeddings
        c = eng.cache
        held = sum(t.nbytes for t in (c.c_kv, c.k_pe, c.rope.cos, c.rope.sin, c.positions))
        assert held == b.kv.cache_bytes
        gen = eng.generate([5, 17, 300], max_new_tokens=4, ignore_eos=True)
        assert len(gen.output_ids) == 4
    finally:
        eng._step.close()
    with pytest.raises(gpu.GpuMemoryError, match="does not fit the GPU"):
        Engine(gpu_pack, ctx_size=10**9, device="cuda")
