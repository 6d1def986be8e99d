"""DeepSeek-R1 at its true dimensions: header-only descriptions of the full 61-layer model (for
`kt-convert --plan`: a GGUF, and DeepSeek's own FP8 safetensors folder) and the `r1-slice`, a few
real-size layers with random data (for measuring the converter at scale).

Both are written tensor by tensor and, within a tensor, in row chunks, so writing them needs
little memory (tens of MB) whatever the tensor sizes. The r1-slice is large on disk all the same
(1 dense + 1 MoE layer: about 16 GB as FP8 safetensors, 8 GB as Q4_K GGUF); fewer experts
(`experts=`) make a smaller one with the same per-tensor shapes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .config import SynthConfig
from .hf import hf_tensor_shapes
from .st_writer import BLOCK, StEntry, bf16_bytes, is_fp8_weight, storage_dtype, write_sharded
from .writer import ARCH, T, TokenizerMeta, _add_metadata, gguf_tensor_shapes, nbytes_of, random_blocks, tensor_type

R1 = SynthConfig(
    name="r1",
    hidden_size=7168,
    num_hidden_layers=61,
    first_k_dense_replace=3,
    intermediate_size=18432,
    moe_intermediate_size=2048,
    n_routed_experts=256,
    num_experts_per_tok=8,
    n_group=8,
    topk_group=4,
    n_shared_experts=1,
    num_attention_heads=128,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    vocab_size=129280,
    max_position_embeddings=163840,
    linear_std=0.02,
    router_std=0.02,
)

CHUNK_BYTES = 32 << 20  # rows written per chunk: about this many bytes


def r1_slice_config(n_dense: int = 1, n_moe: int = 1, experts: int = 256) -> SynthConfig:
    """R1's shapes with `n_dense` dense and `n_moe` MoE layers (and `experts` routed experts)."""
    groups = 8 if experts % 8 == 0 and experts >= 32 else 1
    return R1.replace(
        name="r1slice",
        num_hidden_layers=n_dense + n_moe,
        first_k_dense_replace=n_dense,
        n_routed_experts=experts,
        n_group=groups,
        topk_group=min(4, groups),
    )


class _NoTokenizer:
    """A GGUFWriter whose tokenizer.* keys are dropped (the descriptions carry no vocabulary)."""

    def __init__(self, w: gguf.GGUFWriter):
        self._w = w

    def __getattr__(self, name: str) -> Any:
        f = getattr(self._w, name)
        if not name.startswith("add_"):
            return f

        def add(key: Any, *a: Any, **kw: Any) -> Any:
            if isinstance(key, str) and key.startswith("tokenizer."):
                return None
            return f(key, *a, **kw)

        return add


def _gguf_plan(cfg: SynthConfig, qtype: str) -> list[tuple[str, tuple[int, ...], T]]:
    return [
        (name, shape, tensor_type(name, shape, qtype, cfg.num_hidden_layers))
        for name, shape in gguf_tensor_shapes(cfg, cfg.vocab_size, legacy=False)
    ]


def _gguf_header(cfg: SynthConfig, qtype: str, path: Path) -> tuple[gguf.GGUFWriter, list]:
    plan = _gguf_plan(cfg, qtype)
    w = gguf.GGUFWriter(path, ARCH)
    for name, shape, t in plan:
        w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes_of(shape, t), raw_dtype=t)
    tm = TokenizerMeta(tokens=[], token_types=[], merges=[], bos_id=0, eos_id=1, pad_id=2, chat_template=None)
    _add_metadata(_NoTokenizer(w), cfg, tm, cfg.vocab_size, False, qtype)  # type: ignore[arg-type]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    return w, plan


def write_r1_description(path: str | Path, qtype: str = "Q4_K_M", cfg: SynthConfig = R1) -> Path:
    """A GGUF of the full R1 (61 layers, llama.cpp's current layout) whose tensor table is complete
    and which holds no tensor data: a few hundred KB that `kt-convert --plan` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, _ = _gguf_header(cfg, qtype, path)
    w.close()
    return path


def _row_chunks(shape: tuple[int, ...], row_bytes: float) -> Iterator[tuple[int, int]]:
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    step = max(1, int(CHUNK_BYTES // max(row_bytes, 1)))
    for lo in range(0, rows, step):
        yield lo, min(rows, lo + step)


def write_r1_slice_gguf(path: str | Path, cfg: SynthConfig | None = None, qtype: str = "Q4_K", seed: int = 0) -> Path:
    """The r1-slice as a GGUF with random valid blocks, streamed in row chunks (see module doc)."""
    cfg = cfg or r1_slice_config()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, plan = _gguf_header(cfg, qtype, path)
    align = w.data_alignment
    w.close()
    rng = np.random.default_rng(seed)
    with open(path, "ab") as f:
        for name, shape, t in plan:
            f.write(b"\0" * (-f.tell() % align))
            start = f.tell()
            if len(shape) == 1:
                data = np.ones(shape, np.float32) if name.endswith("norm.weight") else random_blocks(rng, shape, t)
                f.write(np.ascontiguousarray(data).tobytes())
            else:
                row_bytes = nbytes_of(shape[-1:], t)
                for lo, hi in _row_chunks(shape, row_bytes):
                    f.write(np.ascontiguousarray(random_blocks(rng, (hi - lo, shape[-1]), t)).tobytes())
            if f.tell() - start != nbytes_of(shape, t):
                raise AssertionError(f"{name}: wrote {f.tell() - start} bytes, expected {nbytes_of(shape, t)}")
        f.write(b"\0" * (-f.tell() % align))
    return path


# DeepSeek-R1's FP8 checkpoint as published: 163 shards, `model-0000i-of-000163.safetensors`.
R1_SHARDS = 163
R1_SHARD_COUNT_DIGITS = 6
# config.json keys of DeepSeek-R1 that `r1_config_json` does not write (their published values)
R1_CONFIG_EXTRA: dict[str, Any] = {
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "ep_size": 1,
    "initializer_range": 0.02,
    "moe_layer_freq": 1,
    "num_nextn_predict_layers": 1,
    "pretraining_tp": 1,
    "seq_aux": True,
    "transformers_version": "4.46.3",
    "use_cache": True,
}


def r1_fp8_tensor_table(cfg: SynthConfig = R1) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype, shape) of every tensor of DeepSeek's FP8 checkpoint of `cfg`: the
    `num_hidden_layers` layers, and layer `num_hidden_layers` = the multi-token-prediction module (a
    MoE layer plus `embed_tokens`, `enorm`, `hnorm`, `eh_proj`, `shared_head.{norm,head}`, all BF16).
    Every `*_proj` Linear of layers 0..60 and of the MTP's decoder layer is e4m3 with an F32
    `weight_scale_inv` of one value per 128x128 block. For R1: 91,991 tensors, 688,574,839,360 bytes."""
    n = cfg.num_hidden_layers
    h, v = cfg.hidden_size, cfg.vocab_size
    mtp = f"model.layers.{n}."
    shapes = list(hf_tensor_shapes(cfg, v))
    with_mtp = hf_tensor_shapes(cfg.replace(num_hidden_layers=n + 1), v)
    shapes[-2:-2] = [(name, shape) for name, shape in with_mtp if name.startswith(mtp)]  # its decoder layer
    shapes[-2:-2] = [
        (mtp + "embed_tokens.weight", (v, h)),
        (mtp + "enorm.weight", (h,)),
        (mtp + "hnorm.weight", (h,)),
        (mtp + "eh_proj.weight", (h, 2 * h)),
        (mtp + "shared_head.norm.weight", (h,)),
        (mtp + "shared_head.head.weight", (v, h)),
    ]
    out: list[tuple[str, str, tuple[int, ...]]] = []
    for name, shape in shapes:
        dt = "BF16" if name == mtp + "eh_proj.weight" else storage_dtype(name, "FP8")
        out.append((name, dt, shape))
        if dt == "F8_E4M3":
            out.append((name + "_scale_inv", "F32", (-(-shape[0] // BLOCK), -(-shape[1] // BLOCK))))
    return out


def write_r1_safetensors_description(out_dir: str | Path, cfg: SynthConfig = R1) -> Path:
    """DeepSeek-R1's FP8 checkpoint folder without its data: `config.json` (R1's own, with its
    `quantization_config`), `model.safetensors.index.json` and the 163 shards, each of which holds
    only its header (every tensor named with its dtype, shape and offsets; the file ends there).
    About 21 MB in all; `kt-convert --plan` reads it, a conversion refuses it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def no_data() -> list[bytes]:
        raise AssertionError("a header-only description produces no data")

    entries = [StEntry(name, dt, shape, no_data) for name, dt, shape in r1_fp8_tensor_table(cfg)]
    write_sharded(out, entries, R1_SHARDS, header_only=True, count_digits=R1_SHARD_COUNT_DIGITS)
    config = {**r1_config_json(cfg), **R1_CONFIG_EXTRA}
    (out / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n")
    return out


def _random_bf16(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random bf16 bit patterns of magnitude 2^-7 .. 2^-5, random sign and mantissa (fast: no floats)."""
    u = np.frombuffer(rng.bytes(2 * n), dtype=np.uint16)
    return (u & np.uint16(0x80FF)) | np.uint16(0x3C00)


def _random_fp8(rng: np.random.Generator, n: int) -> np.ndarray:
    b = np.frombuffer(rng.bytes(n), dtype=np.uint8).copy()
    b[(b & 0x7F) == 0x7F] &= 0xF0  # no NaN codes
    return b


def _st_entries(cfg: SynthConfig, seed: int) -> list[StEntry]:
    rng = np.random.default_rng(seed)
    out: list[StEntry] = []

    def rows_of(shape: tuple[int, ...], item: int) -> Iterator[tuple[int, int]]:
        return _row_chunks(shape, shape[-1] * item)

    for name, shape in hf_tensor_shapes(cfg, cfg.vocab_size):
        dt = storage_dtype(name, "FP8")
        if dt == "F8_E4M3":
            assert is_fp8_weight(name) and len(shape) == 2
            out.append(
                StEntry(
                    name, dt, shape, lambda s=shape: (_random_fp8(rng, (hi - lo) * s[-1]) for lo, hi in rows_of(s, 1))
                )
            )
            sshape = (-(-shape[0] // BLOCK), -(-shape[1] // BLOCK))
            out.append(
                StEntry(
                    name + "_scale_inv", "F32", sshape,
                    lambda s=sshape: [(rng.random(s, dtype=np.float32) + np.float32(0.5)) * np.float32(1e-4)],
                )
            )  # fmt: skip
        elif dt == "F32":
            out.append(StEntry(name, dt, shape, lambda s=shape: [np.float32(0.1) * rng.standard_normal(s, np.float32)]))
        elif len(shape) == 1:
            out.append(StEntry(name, dt, shape, lambda s=shape: [bf16_bytes(np.ones(s, np.float32))]))
        else:
            out.append(
                StEntry(
                    name, dt, shape,
                    lambda s=shape: (
                        _random_bf16(rng, (hi - lo) * s[-1]) for lo, hi in rows_of(s, 2)
                    ),
                )
            )  # fmt: skip
    return out


def r1_config_json(cfg: SynthConfig, fp8: bool = True) -> dict[str, Any]:
    """config.json with DeepSeek-V3/R1's keys for `cfg` (R1's own values for the rest)."""
    d: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_nextn_predict_layers": 0,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_attention_heads,
        "n_shared_experts": cfg.n_shared_experts,
        "n_routed_experts": cfg.n_routed_experts,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "kv_lora_rank": cfg.kv_lora_rank,
        "q_lora_rank": cfg.q_lora_rank,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "topk_method": "noaux_tc",
        "n_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "first_k_dense_replace": cfg.first_k_dense_replace,
        "norm_topk_prob": cfg.norm_topk_prob,
        "scoring_func": "sigmoid",
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": {k: v for k, v in cfg.rope_scaling().items() if k != "rope_type"},
        "bos_token_id": 0,
        "eos_token_id": 1,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    if fp8:
        d["quantization_config"] = {
            "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK],
        }  # fmt: skip
    return d


def write_r1_slice_fp8(
    out_dir: str | Path, cfg: SynthConfig | None = None, seed: int = 0, shard_gb: float = 4.0
) -> Path:
    """The r1-slice as DeepSeek's FP8 checkpoint (random e4m3 bytes, random block scales), shards of
    about `shard_gb` GB with an index, config.json; no tokenizer. Streamed in row chunks."""
    cfg = cfg or r1_slice_config()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = _st_entries(cfg, seed)
    total = sum(e.nbytes for e in entries)
    write_sharded(out, entries, max(1, math.ceil(total / (shard_gb * 1e9))))
    (out / "config.json").write_text(json.dumps(r1_config_json(cfg), indent=2) + "\n")
    return out
