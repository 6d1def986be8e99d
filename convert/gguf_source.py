"""GGUF reader: one file or a split set (`name-0000N-of-0000M.gguf`), DeepSeek-V3/R1 (`deepseek2`).

The header (metadata and tensor table) is parsed here with explicit checks, so every defect is
reported as one line naming the file; tensor data stay in a read-only memory map.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import re
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ktpack.layouts.config import ModelConfig

from .source import Source, SourceError, SourceTensor

GGUF_MAGIC = b"GGUF"
READ_VERSIONS = (2, 3)
ARCH = "deepseek2"
SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

# GGUF metadata value types (gguf.md): id -> (struct format, size)
_SCALAR = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
           6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}  # fmt: skip
_STRING, _ARRAY = 8, 9
_MAX_STR = 1 << 30
_MAX_COUNT = 1 << 40


class _Cursor:
    """Bounds-checked little-endian reads over a mapped file."""

    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > self.size:
            raise SourceError(f"{self.path.name}: truncated file (ends inside the {what} at byte {self.size})")
        v = memoryview(self.buf)[self.pos : self.pos + n]
        self.pos += n
        return v

    def scalar(self, fmt: str, size: int, what: str) -> Any:
        return struct.unpack(fmt, self.take(size, what))[0]

    def u32(self, what: str) -> int:
        return self.scalar("<I", 4, what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", 8, what)

    def string(self, what: str) -> str:
        n = self.u64(what)
        if n > _MAX_STR:
            raise SourceError(f"{self.path.name}: corrupt header (string of {n} bytes in the {what})")
        try:
            return bytes(self.take(n, what)).decode("utf-8")
        except UnicodeDecodeError:
            raise SourceError(f"{self.path.name}: corrupt header (invalid UTF-8 in the {what})") from None

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _SCALAR:
            return self.scalar(*_SCALAR[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            etype, count = self.u32(what), self.u64(what)
            if count > _MAX_COUNT:
                raise SourceError(f"{self.path.name}: corrupt header (array of {count} items in {what})")
            if etype in _SCALAR:  # fast path for numeric arrays
                fmt, size = _SCALAR[etype]
                raw = self.take(size * count, what)
                return np.frombuffer(raw, dtype=np.dtype(fmt)).tolist()
            return [self.value(etype, what) for _ in range(count)]
        raise SourceError(f"{self.path.name}: corrupt header (unknown value type {vtype} in {what})")


class _GGUFFile:
    def __init__(self, path: Path):
        self.path = path
        try:
            f: BinaryIO = open(path, "rb")
        except OSError as e:
            raise SourceError(f"{path}: cannot open ({e.strerror})") from None
        with f:
            size = path.stat().st_size
            if size < 24:
                raise SourceError(f"{path.name}: truncated file ({size} bytes, smaller than a GGUF header)")
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        c = _Cursor(self.map, path)
        magic = bytes(c.take(4, "magic"))
        if magic != GGUF_MAGIC:
            raise SourceError(f"{path.name}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        self.version = c.u32("version")
        if self.version not in READ_VERSIONS:
            raise SourceError(
                f"{path.name}: GGUF version {self.version} is not read (ktpack reads versions "
                f"{', '.join(map(str, READ_VERSIONS))})"
            )
        n_tensors, n_kv = c.u64("header"), c.u64("header")
        if n_tensors > 1 << 24 or n_kv > 1 << 24:
            raise SourceError(f"{path.name}: corrupt header ({n_tensors} tensors, {n_kv} metadata keys)")
        self.kv: dict[str, Any] = {}
        for _ in range(n_kv):
            key = c.string("metadata")
            self.kv[key] = c.value(c.u32(f"metadata key {key}"), f"metadata key {key}")
        self.infos: list[tuple[str, tuple[int, ...], int, int]] = []
        for _ in range(n_tensors):
            name = c.string("tensor table")
            nd = c.u32(f"tensor table ({name})")
            if nd > 8:
                raise SourceError(f"{path.name}: tensor {name}: corrupt header ({nd} dimensions)")
            ne = tuple(c.u64(f"tensor table ({name})") for _ in range(nd))
            ttype = c.u32(f"tensor table ({name})")
            offset = c.u64(f"tensor table ({name})")
            self.infos.append((name, ne, ttype, offset))
        align = self.kv.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise SourceError(f"{path.name}: general.alignment {align!r} is not a power of two")
        self.alignment = align
        self.data_offset = (c.pos + align - 1) // align * align
        self.header_bytes = c.pos
        self.size = size

    @property
    def header_only(self) -> bool:
        """A description: the tensor table is complete but no tensor data follows it."""
        return self.size <= self.data_offset and any(True for _ in self.infos)

    def tensors(self, header_only_ok: bool = False) -> list[SourceTensor]:
        if self.header_only and not header_only_ok:
            raise SourceError(
                f"{self.path.name}: the file holds only a header (a tensor table without data): it can be "
                f"planned (kt-convert --plan), not converted"
            )
        out = []
        spans = []
        for name, ne, ttype, offset in self.infos:
            try:
                qt = GGMLQuantizationType(ttype)
            except ValueError:
                raise SourceError(f"{self.path.name}: tensor {name} has unknown ggml type id {ttype}") from None
            bv, bb = GGML_QUANT_SIZES[qt]
            if not ne or any(d == 0 for d in ne):
                raise SourceError(f"{self.path.name}: tensor {name} has an empty shape {list(ne)}")
            if ne[0] % bv:
                raise SourceError(
                    f"{self.path.name}: tensor {name}: row length {ne[0]} is not a multiple of the "
                    f"{qt.name} block ({bv})"
                )
            row_bytes = ne[0] // bv * bb
            n_rows = math.prod(ne[1:])
            nbytes = row_bytes * n_rows
            start = self.data_offset + offset
            if offset % self.alignment:
                raise SourceError(f"{self.path.name}: tensor {name} offset {offset} is not aligned to {self.alignment}")
            if self.header_only:
                out.append(SourceTensor(name=name, shape=tuple(reversed(ne)), dtype=qt.name, file=self.path,
                                        _raw=None, _nbytes=nbytes))  # fmt: skip
                continue
            if start + nbytes > self.size:
                raise SourceError(
                    f"{self.path.name}: truncated file: tensor {name} ({qt.name} {list(ne)}) needs bytes "
                    f"up to {start + nbytes}, the file has {self.size}"
                )
            spans.append((start, start + nbytes, name))
            shape = tuple(reversed(ne))
            raw = np.frombuffer(self.map, dtype=np.uint8, count=nbytes, offset=start)
            raw = raw.reshape(*shape[:-1], row_bytes) if len(shape) > 1 else raw
            out.append(SourceTensor(name=name, shape=shape, dtype=qt.name, file=self.path, _raw=raw))
        spans.sort()
        for (_s0, e0, n0), (s1, _, n1) in zip(spans, spans[1:], strict=False):
            if s1 < e0:
                raise SourceError(
                    f"{self.path.name}: tensor {n0} overlaps tensor {n1}: its byte size disagrees with "
                    f"its shape and type, or the tensor table is corrupt"
                )
        return out


def split_set(path: Path) -> list[Path]:
    """The files of the set `path` belongs to (itself alone when it is not a split name)."""
    m = SPLIT_RE.match(path.name)
    if not m:
        return [path]
    count = int(m["count"])
    parts = [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.exists()]
    if missing:
        raise SourceError(f"{path.name}: split set of {count} is missing {', '.join(missing)}")
    return parts


def open_gguf(path: Path | str, header_only_ok: bool = False) -> Source:
    """Open a GGUF (or split set). `header_only_ok`: accept a file whose tensor table has no data
    behind it (a description of a model, for planning); such a Source has `header_only` set."""
    path = Path(path)
    if not path.exists():
        raise SourceError(f"{path}: no such file")
    parts = split_set(path)
    files = [_GGUFFile(p) for p in parts]
    first = files[0]
    kv = dict(first.kv)
    if len(files) > 1 or "split.count" in kv:
        count = kv.get("split.count", 1)
        if count != len(files):
            raise SourceError(f"{first.path.name}: split.count is {count} but {len(files)} files were found")
        for i, f in enumerate(files):
            if f.kv.get("split.no", i) != i:
                raise SourceError(f"{f.path.name}: split.no is {f.kv.get('split.no')}, expected {i}")
    tensors: dict[str, SourceTensor] = {}
    for f in files:
        for t in f.tensors(header_only_ok):
            if t.name in tensors:
                raise SourceError(f"{f.path.name}: tensor {t.name} appears twice in the set")
            tensors[t.name] = t
    want = kv.get("split.tensors.count")
    if want is not None and want != len(tensors):
        raise SourceError(f"{first.path.name}: split.tensors.count is {want}, the set holds {len(tensors)} tensors")

    arch = kv.get("general.architecture")
    if arch != ARCH:
        raise SourceError(f"{first.path.name}: architecture {arch!r} is not supported (ktpack reads {ARCH})")
    notes: list[str] = []
    config = config_from_metadata(kv, tensors, notes, first.path.name)

    from .tokenizer import tokenizer_from_gguf_fields

    tok_files: dict[str, bytes] = {}
    if "tokenizer.ggml.tokens" in kv:
        import json

        try:
            tok, tok_cfg = tokenizer_from_gguf_fields(kv)
        except ValueError as e:
            raise SourceError(f"{first.path.name}: tokenizer metadata: {e}") from None
        tok_files["tokenizer.json"] = tok.to_str(pretty=True).encode() + b"\n"
        tok_files["tokenizer_config.json"] = (json.dumps(tok_cfg, indent=1, sort_keys=True) + "\n").encode()
    else:
        notes.append("the source has no tokenizer metadata: the packed folder has no tokenizer.json")

    fp = {
        "files": [
            {
                "name": f.path.name,
                "size": f.size,
                "header_sha256": hashlib.sha256(f.map[: f.header_bytes]).hexdigest(),
            }
            for f in files
        ]
    }
    meta = {k: v for k, v in kv.items() if not k.startswith("tokenizer.ggml.")}
    return Source(
        kind="gguf",
        files=parts,
        config=config,
        tensors=tensors,
        notes=notes,
        metadata=meta,
        _fingerprint=fp,
        _tokenizer=tok_files,
        header_only=any(f.header_only for f in files),
    )


# DeepSeek-V3/R1's values, used when a GGUF lacks a key (files from older llama.cpp versions).
V3_DEFAULTS = {"expert_group_count": 8, "expert_group_used_count": 4, "expert_gating_func": 2}


def config_from_metadata(
    kv: dict[str, Any], tensors: dict[str, SourceTensor], notes: list[str], fname: str
) -> ModelConfig:
    a = ARCH + "."

    def get(key: str, default: Any = None, required: bool = True) -> Any:
        if a + key in kv:
            return kv[a + key]
        if required and default is None:
            raise SourceError(f"{fname}: metadata key {a + key} is missing")
        return default

    n_layers = int(get("block_count"))
    n_experts = int(get("expert_count", 0, required=False))
    heads = int(get("attention.head_count"))
    rope_dim = int(get("rope.dimension_count"))
    kv_lora = int(get("attention.kv_lora_rank"))
    if a + "attention.key_length_mla" in kv:  # llama.cpp's current MLA-as-MQA description
        nope = int(kv[a + "attention.key_length_mla"]) - rope_dim
        v_dim = int(get("attention.value_length_mla"))
    else:
        nope = int(get("attention.key_length")) - rope_dim
        v_dim = int(get("attention.value_length"))
    has_kb = "blk.0.attn_k_b.weight" in tensors
    has_kvb = "blk.0.attn_kv_b.weight" in tensors
    if not (has_kb or has_kvb):
        raise SourceError(
            f"{fname}: neither blk.0.attn_k_b nor blk.0.attn_kv_b is present: not a DeepSeek-V3 MLA model"
        )

    def fallback(key: str, meaning: str) -> Any:
        if a + key in kv:
            return kv[a + key]
        value = V3_DEFAULTS[key]
        if key.startswith("expert_group") and n_experts % 8:
            value = 1  # no group limit is possible: groups must divide the experts
        notes.append(f"{a + key} is missing: using {value} ({meaning}, DeepSeek-V3's value)")
        return value

    n_group = int(fallback("expert_group_count", "n_group")) if n_experts else 1
    topk_group = int(fallback("expert_group_used_count", "topk_group")) if n_experts else 1
    gating = int(fallback("expert_gating_func", "2 = sigmoid")) if n_experts else 2
    if gating not in (1, 2):
        raise SourceError(f"{fname}: {a}expert_gating_func {gating} is not supported (1 softmax, 2 sigmoid)")
    scaling_type = get("rope.scaling.type", "none", required=False)
    rope_scaling = None
    if scaling_type == "yarn":
        log_mul = float(get("rope.scaling.yarn_log_multiplier", 0.1, required=False))
        mscale_all_dim = round(log_mul / 0.1, 6)  # llama.cpp stores 0.1 * mscale_all_dim
        rope_scaling = {
            "type": "yarn",
            "factor": float(get("rope.scaling.factor")),
            "original_max_position_embeddings": int(get("rope.scaling.original_context_length")),
            "beta_fast": float(get("rope.scaling.yarn_beta_fast", 32.0, required=False)),
            "beta_slow": float(get("rope.scaling.yarn_beta_slow", 1.0, required=False)),
            "mscale": mscale_all_dim,
            "mscale_all_dim": mscale_all_dim,
        }
    elif scaling_type not in ("none", None):
        raise SourceError(f"{fname}: rope scaling {scaling_type!r} is not supported (ktpack reads yarn or none)")
    q_lora = get("attention.q_lora_rank", 0, required=False)
    vocab = (
        get("vocab_size", 0, required=False)
        or len(kv.get("tokenizer.ggml.tokens", []))
        or tensors["token_embd.weight"].shape[0]
    )
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=int(get("embedding_length")),
        intermediate_size=int(get("feed_forward_length")),
        moe_intermediate_size=int(get("expert_feed_forward_length", 0, required=False)),
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        q_lora_rank=int(q_lora) or None,
        kv_lora_rank=kv_lora,
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope_dim,
        v_head_dim=v_dim,
        n_routed_experts=n_experts,
        n_shared_experts=int(get("expert_shared_count", 0, required=False)),
        num_experts_per_tok=int(get("expert_used_count", 0, required=False)),
        n_group=n_group,
        topk_group=topk_group,
        first_k_dense_replace=int(get("leading_dense_block_count", 0, required=False)),
        routed_scaling_factor=float(get("expert_weights_scale", 1.0, required=False)),
        norm_topk_prob=bool(get("expert_weights_norm", False, required=False)),
        scoring_func="sigmoid" if gating == 2 else "softmax",
        topk_method="noaux_tc" if gating == 2 else "greedy",
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0, required=False)),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(get("context_length")),
        bos_token_id=kv.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=kv.get("tokenizer.ggml.eos_token_id"),
        attention_layout="split" if has_kb else "kv_b",
    )
