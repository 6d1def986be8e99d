"""Write synthetic DeepSeek-V3 models as GGUF in llama.cpp's ``deepseek2`` layout.

See shared/reference/gguf_layout.md for what llama.cpp's convert_hf_to_gguf.py + quantize write;
this module reproduces the tensor names, shapes, per-tensor types and metadata keys.
Tensors are planned first (names, shapes, types) and produced one at a time while writing, so
memory stays bounded by the largest single tensor.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf.constants import Keys
from gguf.gguf_writer import WriterState

from ..names import GGUF_TO_HF, GLOBAL_GGUF_TO_HF
from . import kquants
from .config import SynthConfig, get_config

ARCH = "deepseek2"
T = gguf.GGMLQuantizationType

QTYPES = ("F32", "BF16", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q4_K_M")

FILE_TYPE = {
    "F32": gguf.LlamaFileType.ALL_F32,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_S,
    "Q5_K": gguf.LlamaFileType.MOSTLY_Q5_K_S,
    "Q6_K": gguf.LlamaFileType.MOSTLY_Q6_K,
    "Q4_K_M": gguf.LlamaFileType.MOSTLY_Q4_K_M,
}

# llama.cpp's fallback when ne0 is not a multiple of the k-quant super-block (256)
FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0, T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_1}

# GGUF token types
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's rule for giving some ffn_down layers more bits in *_M mixes."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _layer_of(name: str) -> int | None:
    if name.startswith("blk."):
        return int(name.split(".")[1])
    return None


def tensor_type(name: str, np_shape: tuple[int, ...], qtype: str, n_layers: int) -> T:
    """The ggml type llama.cpp would give tensor ``name`` in a ``qtype`` file."""
    if qtype not in QTYPES:
        raise ValueError(f"unknown qtype {qtype!r}; choose from {', '.join(QTYPES)}")
    if len(np_shape) == 1 or ".ffn_gate_inp." in name or name.endswith("exp_probs_b.bias"):
        return T.F32
    if qtype == "Q4_K_M":
        if name == "output.weight":
            t = T.Q6_K
        elif ".ffn_down" in name:
            layer = _layer_of(name)
            t = T.Q6_K if layer is not None and use_more_bits(layer, n_layers) else T.Q4_K
        else:
            t = T.Q4_K
    else:
        t = T[qtype]
    ne0 = np_shape[-1]
    block, _ = gguf.GGML_QUANT_SIZES[t]
    if ne0 % block != 0:
        t = FALLBACK.get(t, T.F16)
        if ne0 % gguf.GGML_QUANT_SIZES[t][0] != 0:
            t = T.F16
    return t


def nbytes_of(np_shape: tuple[int, ...], t: T) -> int:
    block, size = gguf.GGML_QUANT_SIZES[t]
    return math.prod(np_shape) // block * size


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]  # numpy order (ne reversed)
    qtype: T
    # () -> float32 array of `shape`; for stacked experts (e) -> float32 [rows, cols] of expert e
    source: Callable[..., np.ndarray]
    stacked: bool = False


def gguf_tensor_shapes(cfg: SynthConfig, vocab_size: int, legacy: bool) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(GGUF name, numpy shape) for every tensor, in the order they are written."""
    h, nh = cfg.hidden_size, cfg.num_attention_heads
    E, inter = cfg.n_routed_experts, cfg.moe_intermediate_size
    yield "token_embd.weight", (vocab_size, h)
    for i in range(cfg.num_hidden_layers):
        b = f"blk.{i}."
        yield b + "attn_norm.weight", (h,)
        yield b + "attn_q_a.weight", (cfg.q_lora_rank, h)
        yield b + "attn_q_a_norm.weight", (cfg.q_lora_rank,)
        yield b + "attn_q_b.weight", (nh * cfg.qk_head_dim, cfg.q_lora_rank)
        yield b + "attn_kv_a_mqa.weight", (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h)
        yield b + "attn_kv_a_norm.weight", (cfg.kv_lora_rank,)
        if legacy:
            yield b + "attn_kv_b.weight", (nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
        else:
            yield b + "attn_k_b.weight", (nh, cfg.kv_lora_rank, cfg.qk_nope_head_dim)
            yield b + "attn_v_b.weight", (nh, cfg.v_head_dim, cfg.kv_lora_rank)
        yield b + "attn_output.weight", (h, nh * cfg.v_head_dim)
        yield b + "ffn_norm.weight", (h,)
        if i < cfg.first_k_dense_replace:
            yield b + "ffn_gate.weight", (cfg.intermediate_size, h)
            yield b + "ffn_up.weight", (cfg.intermediate_size, h)
            yield b + "ffn_down.weight", (h, cfg.intermediate_size)
        else:
            sh = inter * cfg.n_shared_experts
            yield b + "ffn_gate_inp.weight", (E, h)
            yield b + "exp_probs_b.bias", (E,)
            yield b + "ffn_gate_exps.weight", (E, inter, h)
            yield b + "ffn_up_exps.weight", (E, inter, h)
            yield b + "ffn_down_exps.weight", (E, h, inter)
            yield b + "ffn_gate_shexp.weight", (sh, h)
            yield b + "ffn_up_shexp.weight", (sh, h)
            yield b + "ffn_down_shexp.weight", (h, sh)
    yield "output_norm.weight", (h,)
    yield "output.weight", (vocab_size, h)


_EXPS = {
    "ffn_gate_exps.weight": "gate_proj",
    "ffn_up_exps.weight": "up_proj",
    "ffn_down_exps.weight": "down_proj",
}


def hf_source_names(gguf_name: str, cfg: SynthConfig) -> list[str]:
    """The HF tensors a GGUF tensor is made from (experts: one per expert, k_b/v_b: kv_b)."""
    if gguf_name in GLOBAL_GGUF_TO_HF:
        return [GLOBAL_GGUF_TO_HF[gguf_name]]
    _, i, rest = gguf_name.split(".", 2)
    p = f"model.layers.{i}."
    if rest in _EXPS:
        return [p + f"mlp.experts.{e}.{_EXPS[rest]}.weight" for e in range(cfg.n_routed_experts)]
    if rest in ("attn_k_b.weight", "attn_v_b.weight"):
        return [p + "self_attn.kv_b_proj.weight"]
    return [p + GGUF_TO_HF[rest]]


def split_kv_b(kv_b: np.ndarray, n_heads: int, nope: int, v_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """kv_b [H*(nope+v), kv_lora] -> (k_b [H, kv_lora, nope] (transposed per head), v_b [H, v, kv_lora])."""
    kv = kv_b.reshape(n_heads, nope + v_dim, kv_b.shape[-1])
    k_b = np.ascontiguousarray(kv[:, :nope, :].transpose(0, 2, 1))
    v_b = np.ascontiguousarray(kv[:, nope:, :])
    return k_b, v_b


# ---------------------------------------------------------------------------------------------
# metadata


@dataclass
class TokenizerMeta:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int
    eos_id: int
    pad_id: int
    chat_template: str | None


def tokenizer_meta_from_hf(hf_dir: Path, vocab_size: int | None = None) -> TokenizerMeta:
    """GGUF tokenizer arrays from an HF tokenizer.json (+ tokenizer_config.json).

    If ``vocab_size`` exceeds the tokenizer's size the vocabulary is padded with DeepSeek-style
    ``<｜place▁holder▁no▁N｜>`` control tokens (as the real DeepSeek-V3 vocabulary is).
    """
    tj = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    types: dict[int, int] = {}
    for at in tj.get("added_tokens", []):
        vocab[at["content"]] = at["id"]
        looks_special = at["content"].startswith("<｜") and at["content"].endswith("｜>")
        types[at["id"]] = TOKEN_CONTROL if at.get("special") or looks_special else TOKEN_USER_DEFINED
    n = max(vocab.values()) + 1
    tokens = [""] * n
    for t, i in vocab.items():
        tokens[i] = t
    if any(t == "" for t in tokens):
        raise ValueError("tokenizer.json has holes in its id space")
    token_types = [types.get(i, TOKEN_NORMAL) for i in range(n)]
    if vocab_size is not None and vocab_size > n:
        for k in range(vocab_size - n):
            tokens.append(f"<｜place▁holder▁no▁{k}｜>")
            token_types.append(TOKEN_CONTROL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    tc_path = hf_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.exists() else {}

    def tid(key: str, default: int) -> int:
        v = tc.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        return vocab.get(v, default) if isinstance(v, str) else default

    return TokenizerMeta(
        tokens=tokens,
        token_types=token_types,
        merges=merges,
        bos_id=tid("bos_token", 0),
        eos_id=tid("eos_token", 1),
        pad_id=tid("pad_token", 2),
        chat_template=tc.get("chat_template"),
    )


def _add_metadata(
    w: gguf.GGUFWriter,
    cfg: SynthConfig,
    tm: TokenizerMeta,
    vocab_size: int,
    legacy: bool,
    qtype: str,
    omit: frozenset[str] = frozenset(),
) -> None:
    a = ARCH
    w.add_type("model")
    w.add_name(cfg.name.capitalize())
    total, shared, expert, n_exp = w.get_total_parameter_count()
    w.add_size_label(gguf.size_label(total, shared, expert, n_exp))

    def u32(key: str, value: int) -> None:
        if key not in omit:  # `omit` makes files as older llama.cpp versions wrote them
            w.add_uint32(key, value)

    def f32(key: str, value: float) -> None:
        if key not in omit:
            w.add_float32(key, value)

    u32(Keys.LLM.BLOCK_COUNT.format(arch=a), cfg.num_hidden_layers)
    u32(Keys.LLM.CONTEXT_LENGTH.format(arch=a), cfg.max_position_embeddings)
    u32(Keys.LLM.EMBEDDING_LENGTH.format(arch=a), cfg.hidden_size)
    u32(Keys.LLM.FEED_FORWARD_LENGTH.format(arch=a), cfg.intermediate_size)
    u32(Keys.Attention.HEAD_COUNT.format(arch=a), cfg.num_attention_heads)
    u32(Keys.Attention.HEAD_COUNT_KV.format(arch=a), cfg.num_attention_heads if legacy else 1)
    w.add_string(Keys.Rope.SCALING_TYPE.format(arch=a), "yarn")
    f32(Keys.Rope.SCALING_FACTOR.format(arch=a), cfg.rope_factor)
    u32(Keys.Rope.SCALING_ORIG_CTX_LEN.format(arch=a), cfg.original_max_position_embeddings)
    f32(Keys.Rope.SCALING_YARN_BETA_FAST.format(arch=a), cfg.beta_fast)
    f32(Keys.Rope.SCALING_YARN_BETA_SLOW.format(arch=a), cfg.beta_slow)
    f32(Keys.Rope.FREQ_BASE.format(arch=a), cfg.rope_theta)
    f32(Keys.Attention.LAYERNORM_RMS_EPS.format(arch=a), cfg.rms_norm_eps)
    u32(Keys.LLM.EXPERT_COUNT.format(arch=a), cfg.n_routed_experts)
    u32(Keys.LLM.EXPERT_USED_COUNT.format(arch=a), cfg.num_experts_per_tok)
    u32(Keys.LLM.EXPERT_GROUP_COUNT.format(arch=a), cfg.n_group)
    u32(Keys.LLM.EXPERT_GROUP_USED_COUNT.format(arch=a), cfg.topk_group)
    u32(Keys.LLM.EXPERT_GATING_FUNC.format(arch=a), gguf.ExpertGatingFuncType.SIGMOID)
    if legacy:
        u32(Keys.Attention.KEY_LENGTH.format(arch=a), cfg.qk_head_dim)
        u32(Keys.Attention.VALUE_LENGTH.format(arch=a), cfg.v_head_dim)
    else:
        u32(Keys.Attention.KEY_LENGTH.format(arch=a), cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        u32(Keys.Attention.VALUE_LENGTH.format(arch=a), cfg.kv_lora_rank)
    u32(Keys.LLM.LEADING_DENSE_BLOCK_COUNT.format(arch=a), cfg.first_k_dense_replace)
    u32(Keys.LLM.VOCAB_SIZE.format(arch=a), vocab_size)
    u32(Keys.Attention.Q_LORA_RANK.format(arch=a), cfg.q_lora_rank)
    u32(Keys.Attention.KV_LORA_RANK.format(arch=a), cfg.kv_lora_rank)
    if not legacy:
        u32(Keys.Attention.KEY_LENGTH_MLA.format(arch=a), cfg.qk_head_dim)
        u32(Keys.Attention.VALUE_LENGTH_MLA.format(arch=a), cfg.v_head_dim)
    u32(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH.format(arch=a), cfg.moe_intermediate_size)
    u32(Keys.LLM.EXPERT_SHARED_COUNT.format(arch=a), cfg.n_shared_experts)
    f32(Keys.LLM.EXPERT_WEIGHTS_SCALE.format(arch=a), cfg.routed_scaling_factor)
    w.add_bool(Keys.LLM.EXPERT_WEIGHTS_NORM.format(arch=a), cfg.norm_topk_prob)
    u32(Keys.Rope.DIMENSION_COUNT.format(arch=a), cfg.qk_rope_head_dim)
    f32(Keys.Rope.SCALING_YARN_LOG_MUL.format(arch=a), 0.1 * cfg.mscale_all_dim)
    w.add_string(Keys.Tokenizer.MODEL, "gpt2")
    w.add_string(Keys.Tokenizer.PRE, "deepseek-v3")
    w.add_array(Keys.Tokenizer.LIST, tm.tokens)
    w.add_array(Keys.Tokenizer.TOKEN_TYPE, tm.token_types)
    w.add_array(Keys.Tokenizer.MERGES, tm.merges)
    u32(Keys.Tokenizer.BOS_ID, tm.bos_id)
    u32(Keys.Tokenizer.EOS_ID, tm.eos_id)
    u32(Keys.Tokenizer.PAD_ID, tm.pad_id)
    w.add_bool(Keys.Tokenizer.ADD_BOS, True)
    w.add_bool(Keys.Tokenizer.ADD_EOS, False)
    if tm.chat_template:
        w.add_string(Keys.Tokenizer.CHAT_TEMPLATE, tm.chat_template)
    u32(Keys.General.QUANTIZATION_VERSION, gguf.GGML_QUANT_VERSION)
    u32(Keys.General.FILE_TYPE, int(FILE_TYPE[qtype]))


# ---------------------------------------------------------------------------------------------
# writing


def _encode(x: np.ndarray, t: T) -> np.ndarray:
    out = np.ascontiguousarray(kquants.quantize(np.asarray(x, dtype=np.float32), t))
    if t == T.F32:
        return out.astype(np.float32, copy=False)
    if t == T.F16:
        return out.astype(np.float16, copy=False)
    return out.view(np.uint8)


def _produce(pt: PlannedTensor) -> np.ndarray:
    if not pt.stacked:
        return _encode(pt.source(), pt.qtype).reshape(-1)
    E = pt.shape[0]
    first = _encode(pt.source(0), pt.qtype).reshape(-1)
    out = np.empty((E, first.size), dtype=first.dtype)
    out[0] = first
    for e in range(1, E):
        out[e] = _encode(pt.source(e), pt.qtype).reshape(-1)
    return out.reshape(-1)


def _produce_chunks(pt: PlannedTensor) -> Iterator[np.ndarray]:
    """Like _produce, one expert at a time (memory: one expert, not the stacked tensor)."""
    if not pt.stacked:
        yield _encode(pt.source(), pt.qtype).reshape(-1)
        return
    for e in range(pt.shape[0]):
        yield _encode(pt.source(e), pt.qtype).reshape(-1)


def _write_tensor_chunks(w: gguf.GGUFWriter, pt: PlannedTensor, chunks: Iterable[np.ndarray]) -> None:
    """GGUFWriter.write_tensor_data for data given as consecutive chunks (single-file writers only)."""
    if len(w.fout or []) != 1:
        raise ValueError("streamed tensors need a single-file GGUF")
    fout = w.fout[0]
    first = next(iter(w.tensors[0]))
    if first != pt.name:
        raise AssertionError(f"writing {pt.name} but the next planned tensor is {first}")
    ti = w.tensors[0].pop(first)
    w.write_padding(fout, fout.tell())
    n = 0
    for c in chunks:
        c = np.ascontiguousarray(c)
        c.tofile(fout)
        n += c.nbytes
    if n != ti.nbytes:
        raise AssertionError(f"{pt.name}: {n} bytes, expected {ti.nbytes}")
    w.write_padding(fout, n)
    w.state = WriterState.WEIGHTS


def _write(
    plan: list[PlannedTensor],
    out_path: Path,
    meta: Callable[[gguf.GGUFWriter], None],
    split: int | None = None,
    produce: Callable[[PlannedTensor], np.ndarray | Iterable[np.ndarray]] | None = None,
) -> list[Path]:
    """Write `plan`; `produce` gives each tensor's raw data, whole (an array) or as chunks (an
    iterable of arrays, single-file only: then memory holds one chunk, not the tensor)."""
    produce = produce or _produce
    out_path.parent.mkdir(parents=True, exist_ok=True)
    max_tensors = 0
    if split is not None and split > 1:
        max_tensors = math.ceil(len(plan) / split)
        if math.ceil(len(plan) / max_tensors) != split:
            raise ValueError(f"cannot split {len(plan)} tensors into {split} parts")
    w = gguf.GGUFWriter(out_path, ARCH, split_max_tensors=max_tensors)
    for pt in plan:
        w.add_tensor_info(pt.name, pt.shape, np.dtype(np.float32), nbytes_of(pt.shape, pt.qtype), raw_dtype=pt.qtype)
    meta(w)
    paths = w.format_shard_names(out_path)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for pt in plan:
            data = produce(pt)
            if not isinstance(data, np.ndarray):
                _write_tensor_chunks(w, pt, data)
                continue
            if data.nbytes != nbytes_of(pt.shape, pt.qtype):
                raise AssertionError(f"{pt.name}: {data.nbytes} bytes, expected {nbytes_of(pt.shape, pt.qtype)}")
            w.write_tensor_data(data)
    finally:
        w.close()
    return list(paths)


def write_gguf(
    hf_dir: str | Path,
    out_path: str | Path,
    qtype: str,
    legacy: bool = False,
    split: int | None = None,
    omit_keys: frozenset[str] = frozenset(),
) -> list[Path]:
    """Convert an HF DeepSeek-V3 folder written by make_hf_checkpoint into GGUF (deepseek2).

    Returns the written file(s); ``split=N`` gives ``stem-0000i-of-0000N.gguf`` parts with all
    metadata in the first part.
    """
    from safetensors import safe_open

    hf_dir = Path(hf_dir)
    out_path = Path(out_path)
    cfg = config_from_hf(hf_dir).replace(name=out_path.name.split("-")[0] or "model")
    vocab_size = cfg.vocab_size
    tm = tokenizer_meta_from_hf(hf_dir, vocab_size)
    if len(tm.tokens) != vocab_size:
        raise ValueError(f"tokenizer has {len(tm.tokens)} tokens but vocab_size is {vocab_size}")
    st = safe_open(str(hf_dir / "model.safetensors"), framework="numpy")

    def get(name: str) -> np.ndarray:
        return np.asarray(st.get_tensor(name), dtype=np.float32)

    plan: list[PlannedTensor] = []
    for name, shape in gguf_tensor_shapes(cfg, vocab_size, legacy):
        t = tensor_type(name, shape, qtype, cfg.num_hidden_layers)
        srcs = hf_source_names(name, cfg)
        if name.endswith(("_exps.weight",)):
            plan.append(PlannedTensor(name, shape, t, lambda e, s=srcs: get(s[e]), stacked=True))
        elif name.endswith("attn_k_b.weight"):
            plan.append(PlannedTensor(name, shape, t, lambda s=srcs[0]: split_kv_b(get(s), *_kvb_dims(cfg))[0]))
        elif name.endswith("attn_v_b.weight"):
            plan.append(PlannedTensor(name, shape, t, lambda s=srcs[0]: split_kv_b(get(s), *_kvb_dims(cfg))[1]))
        else:
            plan.append(PlannedTensor(name, shape, t, lambda s=srcs[0]: get(s)))
    return _write(plan, out_path, lambda w: _add_metadata(w, cfg, tm, vocab_size, legacy, qtype, omit_keys), split)


def _kvb_dims(cfg: SynthConfig) -> tuple[int, int, int]:
    return cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim


def config_from_hf(hf_dir: str | Path) -> SynthConfig:
    """SynthConfig from a config.json (DeepSeek-V3 style keys)."""
    c: dict[str, Any] = json.loads((Path(hf_dir) / "config.json").read_text(encoding="utf-8"))
    rs = c.get("rope_scaling") or c.get("rope_parameters") or {}
    return SynthConfig(
        name=str(c.get("_ktpack_name", "model")),
        hidden_size=c["hidden_size"],
        num_hidden_layers=c["num_hidden_layers"],
        first_k_dense_replace=c["first_k_dense_replace"],
        intermediate_size=c["intermediate_size"],
        moe_intermediate_size=c["moe_intermediate_size"],
        n_routed_experts=c["n_routed_experts"],
        num_experts_per_tok=c["num_experts_per_tok"],
        n_group=c["n_group"],
        topk_group=c["topk_group"],
        n_shared_experts=c["n_shared_experts"],
        num_attention_heads=c["num_attention_heads"],
        q_lora_rank=c["q_lora_rank"],
        kv_lora_rank=c["kv_lora_rank"],
        qk_nope_head_dim=c["qk_nope_head_dim"],
        qk_rope_head_dim=c["qk_rope_head_dim"],
        v_head_dim=c["v_head_dim"],
        vocab_size=c["vocab_size"],
        routed_scaling_factor=float(c["routed_scaling_factor"]),
        norm_topk_prob=bool(c["norm_topk_prob"]),
        rms_norm_eps=float(c["rms_norm_eps"]),
        rope_theta=float(c.get("rope_theta", rs.get("rope_theta", 10000.0))),
        rope_factor=float(rs.get("factor", 1.0)),
        original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 4096)),
        beta_fast=float(rs.get("beta_fast", 32.0)),
        beta_slow=float(rs.get("beta_slow", 1.0)),
        mscale=float(rs.get("mscale", 1.0)),
        mscale_all_dim=float(rs.get("mscale_all_dim", 0.0)),
        max_position_embeddings=c["max_position_embeddings"],
    )


# ---------------------------------------------------------------------------------------------
# random-block files for speed measurements

# byte offsets of the f16 scale fields inside one block, per type
_F16_FIELDS = {
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q8_0: (0,),
    T.Q2_K: (80, 82),
    T.Q3_K: (108,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
}


def random_blocks(rng: np.random.Generator, shape: tuple[int, ...], t: T) -> np.ndarray:
    """Valid random data of numpy ``shape`` in type ``t`` (flat array of the raw representation)."""
    n = math.prod(shape)
    if t == T.F32:
        return rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)
    if t in (T.F16, T.BF16):
        x = (rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)).astype(np.float32)
        return kquants.quantize(x, t).reshape(-1)
    block, size = gguf.GGML_QUANT_SIZES[t]
    nblocks = n // block
    raw = np.frombuffer(bytearray(rng.bytes(nblocks * size)), dtype=np.uint8).reshape(nblocks, size)
    scales = (rng.random(nblocks, dtype=np.float32) * np.float32(0.004) + np.float32(0.001)).astype(np.float16)
    sb = scales.view(np.uint8).reshape(nblocks, 2)
    for off in _F16_FIELDS[t]:
        raw[:, off : off + 2] = sb
    return raw.reshape(-1)


RANDOM_CHUNK_BYTES = 32 << 20


def synth_tokenizer_meta(cfg: SynthConfig, seed: int = 0) -> TokenizerMeta:
    """The synthetic models' tokenizer (trained BPE, padded with placeholder tokens to the vocab size)."""
    import tempfile

    from .corpus import BOS, CHAT_TEMPLATE, EOS, PAD, train_tokenizer

    tok = train_tokenizer(cfg.vocab_size, seed=seed)
    with tempfile.TemporaryDirectory() as td:
        (Path(td) / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
        (Path(td) / "tokenizer_config.json").write_text(
            json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "chat_template": CHAT_TEMPLATE}),
            encoding="utf-8",
        )
        return tokenizer_meta_from_hf(Path(td), cfg.vocab_size)


def write_random_gguf(
    preset: str | SynthConfig, out_path: str | Path, qtype: str, seed: int = 0, legacy: bool = False
) -> list[Path]:
    """A GGUF of ``preset``'s dimensions with random but valid blocks, written tensor by tensor.

    Only the tokenizer is real (trained BPE, padded with placeholder tokens to the vocab size).
    Tensors over RANDOM_CHUNK_BYTES are made and written in row chunks, so memory stays at tens of
    MB whatever the preset (r1dims: 528 MB expert tensors).
    """
    cfg = get_config(preset)
    tm = synth_tokenizer_meta(cfg, seed)
    vocab_size = max(cfg.vocab_size, len(tm.tokens))
    rng = np.random.default_rng(seed)
    plan = []
    for name, shape in gguf_tensor_shapes(cfg, vocab_size, legacy):
        t = tensor_type(name, shape, qtype, cfg.num_hidden_layers)
        if t == T.F32 and len(shape) == 1 and name.endswith("norm.weight"):
            src: Callable[..., np.ndarray] = lambda s=shape: np.ones(s, dtype=np.float32)  # noqa: E731
        else:
            src = lambda s=shape, tt=t: random_blocks(rng, s, tt)  # noqa: E731
        plan.append(PlannedTensor(name, shape, t, src))

    def produce_raw(pt: PlannedTensor) -> np.ndarray | Iterator[np.ndarray]:
        if nbytes_of(pt.shape, pt.qtype) <= RANDOM_CHUNK_BYTES:
            return pt.source()
        # large tensors (R1-sized experts) in row chunks: memory holds one chunk, not the tensor
        rows, cols = math.prod(pt.shape[:-1]), pt.shape[-1]
        step = max(1, RANDOM_CHUNK_BYTES // nbytes_of((cols,), pt.qtype))
        return (random_blocks(rng, (min(rows, lo + step) - lo, cols), pt.qtype) for lo in range(0, rows, step))

    out_path = Path(out_path)
    meta = lambda w: _add_metadata(w, cfg, tm, vocab_size, legacy, qtype)  # noqa: E731
    return _write(plan, out_path, meta, split=None, produce=produce_raw)


def write_float_gguf(
    preset: str | SynthConfig, out_path: str | Path, qtype: str, seed: int = 0, legacy: bool = False
) -> list[Path]:
    """A GGUF of ``preset`` with real (random-init) float weights quantized to ``qtype``, without an
    HF folder: each tensor is made by hf.make_tensor (the generator make_hf_checkpoint uses, the same
    values per HF name and shape) and quantized as write_gguf does, one tensor (experts: one expert)
    at a time, so memory stays at one tensor whatever the preset.

    Unlike write_random_gguf every qtype of one (preset, seed) is the same model, so engines can be
    compared on their greedy tokens. The tokenizer is the one write_random_gguf writes; the vocabulary
    is padded to ``cfg.vocab_size`` (the HF checkpoint keeps the tokenizer's size, so its
    embed_tokens/lm_head differ from these when the BPE did not reach ``cfg.vocab_size``).
    """
    from .hf import make_tensor

    cfg = get_config(preset)
    tm = synth_tokenizer_meta(cfg, seed)
    vocab_size = max(cfg.vocab_size, len(tm.tokens))
    kv_b_shape = (cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)

    def hf(name: str, shape: tuple[int, ...]) -> np.ndarray:
        return make_tensor(cfg, name, shape, seed)

    plan: list[PlannedTensor] = []
    for name, shape in gguf_tensor_shapes(cfg, vocab_size, legacy):
        t = tensor_type(name, shape, qtype, cfg.num_hidden_layers)
        srcs = hf_source_names(name, cfg)
        if name.endswith("_exps.weight"):
            plan.append(PlannedTensor(name, shape, t, lambda e, s=srcs, sh=shape[1:]: hf(s[e], sh), stacked=True))
        elif name.endswith(("attn_k_b.weight", "attn_v_b.weight")):
            which = 0 if name.endswith("attn_k_b.weight") else 1
            src = lambda s=srcs[0], i=which: split_kv_b(hf(s, kv_b_shape), *_kvb_dims(cfg))[i]  # noqa: E731
            plan.append(PlannedTensor(name, shape, t, src))
        else:
            plan.append(PlannedTensor(name, shape, t, lambda s=srcs[0], sh=shape: hf(s, sh)))
    out_path = Path(out_path)
    meta = lambda w: _add_metadata(w, cfg, tm, vocab_size, legacy, qtype)  # noqa: E731
    return _write(plan, out_path, meta, split=None, produce=_produce_chunks)
