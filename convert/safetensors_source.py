"""Safetensors reader: a DeepSeek-V3/R1 Hugging Face folder, BF16/F16/F32 or FP8 with block scales.

A folder holds `config.json` (DeepSeek-V3's keys), `model.safetensors.index.json` naming the shards
(or one `model.safetensors`), and `tokenizer.json` + `tokenizer_config.json`. Headers are parsed
here with explicit checks, so every defect is one line naming the file and the tensor; tensor
data stay in read-only memory maps and are read one slice at a time.

- Names: Hugging Face names are mapped to llama.cpp's GGUF names (`HF_TO_GGUF`), so a pack from a
  safetensors source has the same tensor names as one from a GGUF and the runtime reads both the
  same way. The per-expert tensors `model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight` are
  one logical tensor `blk.N.ffn_{gate,up,down}_exps.weight [E, rows, cols]` whose matrices are read
  from their own safetensors tensors, one at a time. `kv_b_proj` stays one `attn_kv_b` (the runtime
  splits it at load).
- FP8 (formats.md §4.5): a `float8_e4m3fn [out, in]` weight has a `<name>_scale_inv` float32
  `[ceil(out/B0), ceil(in/B1)]` next to it (B = `weight_block_size`, 128x128); the value is
  `f32(q) * scale_inv[i // B0, j // B1]` (a multiplier, despite the name). It is computed for the
  slice being converted only.
- Layers `>= num_hidden_layers` (R1's layer 61: the multi-token-prediction module) are skipped and
  the manifest notes say so.
- A shard that holds only its header (the tensor table, no data: a description of a checkpoint, as
  `convert/synth/r1.py` writes for the full R1) is read for planning only (`header_only_ok`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ktpack.layouts.config import ModelConfig

from .names import GLOBAL_HF_TO_GGUF, HF_TO_GGUF
from .source import Source, SourceError, SourceTensor, result_shape

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MODEL_TYPES = ("deepseek_v3",)
ARCHITECTURES = ("DeepseekV3ForCausalLM",)
FP8 = "F8_E4M3"
# safetensors dtype -> bytes per value, for the types ktpack reads
READ_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, FP8: 1}
SCALE_DTYPES = ("F32", "BF16", "F16")
# every safetensors dtype (for a clear refusal of the others)
ALL_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8, "F64": 8,
              "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1, **READ_DTYPES}  # fmt: skip
MAX_HEADER = 100 << 20

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
SCALE_SUFFIX = "_scale_inv"


def fp8_e4m3_table() -> np.ndarray:
    """float32 value of each e4m3fn byte (formats.md §4.5): bias 7, no infinity, 0x7F/0xFF NaN."""
    b = np.arange(256)
    e, m = (b >> 3) & 15, (b & 7).astype(np.float64)
    mag = np.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * 2.0 ** (e - 7))
    v = np.where(b & 0x80, -mag, mag)
    v[(e == 15) & ((b & 7) == 7)] = np.nan
    return v.astype(np.float32)


FP8_TABLE = fp8_e4m3_table()


def hf_to_gguf_name(hf: str) -> tuple[str, int | None, int | None] | None:
    """(GGUF name, layer, expert) of a Hugging Face tensor name, or None if it is not one ktpack maps."""
    if hf in GLOBAL_HF_TO_GGUF:
        return GLOBAL_HF_TO_GGUF[hf], None, None
    m = _LAYER.match(hf)
    if not m:
        return None
    layer, rest = int(m.group(1)), m.group(2)
    e = _EXPERT.match(rest)
    if e:
        return f"blk.{layer}.ffn_{e.group(2)}_exps.weight", layer, int(e.group(1))
    if rest in HF_TO_GGUF:
        return f"blk.{layer}.{HF_TO_GGUF[rest]}", layer, None
    return None


# ------------------------------------------------------------------------------------------ files


class _STFile:
    """One safetensors file: the header parsed and checked; data mapped on first use.

    `header_only_ok`: accept a file that ends right after its header although its tensors hold
    data (a description of a checkpoint, for planning); `header_only` is then set and no tensor
    data can be read."""

    def __init__(self, path: Path, header_only_ok: bool = False):
        self.path = path
        try:
            with open(path, "rb") as f:
                self.size = path.stat().st_size
                head = f.read(8)
                if len(head) < 8:
                    raise SourceError(f"{path.name}: truncated file ({self.size} bytes, no safetensors header)")
                n = int.from_bytes(head, "little")
                if n > MAX_HEADER or 8 + n > self.size:
                    raise SourceError(
                        f"{path.name}: not a safetensors file (header length {n}, file {self.size} bytes)"
                    )
                raw = f.read(n)
        except OSError as e:
            raise SourceError(f"{path}: cannot open ({e.strerror})") from None
        self.header_sha256 = hashlib.sha256(head + raw).hexdigest()
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SourceError(f"{path.name}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise SourceError(f"{path.name}: corrupt safetensors header (not a JSON object)")
        self.data_start = 8 + n
        self.infos: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        self.header_only = False
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise SourceError(f"{path.name}: tensor {name}: corrupt header entry {info!r}") from None
            if dtype not in ALL_DTYPES:
                raise SourceError(f"{path.name}: tensor {name} has unknown dtype {dtype!r}")
            want = math.prod(shape) * ALL_DTYPES[dtype]
            if end - begin != want or begin < 0:
                raise SourceError(
                    f"{path.name}: tensor {name}: data_offsets [{begin}, {end}) hold {end - begin} bytes, "
                    f"{dtype} {list(shape)} needs {want}"
                )
            self.infos[name] = (dtype, shape, begin, end)
        if self.size == self.data_start and any(end > 0 for _, _, _, end in self.infos.values()):
            if not header_only_ok:
                raise SourceError(
                    f"{path.name}: the file holds only a header (a tensor table without data): it can be "
                    f"planned (kt-convert --plan), not converted"
                )
            self.header_only = True
        else:
            for name, (_, _, _, end) in self.infos.items():
                if self.data_start + end > self.size:
                    raise SourceError(
                        f"{path.name}: truncated file: tensor {name} needs bytes up to {self.data_start + end}, "
                        f"the file has {self.size}"
                    )
        self._map: np.memmap | None = None

    def bytes_of(self, name: str) -> np.ndarray:
        """uint8 view of a tensor's data (read-only map of the file)."""
        if self.header_only:
            raise SourceError(
                f"{self.path.name}: tensor {name}: the file holds no data (a header-only description can "
                f"only be planned)"
            )
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        _, _, begin, end = self.infos[name]
        return self._map[self.data_start + begin : self.data_start + end]


@dataclass
class _Part:
    """One safetensors tensor (with its FP8 block scales)."""

    file: _STFile
    key: str
    dtype: str
    shape: tuple[int, ...]
    scale: _Part | None = None
    block: tuple[int, int] = (128, 128)

    @property
    def nbytes(self) -> int:
        _, _, b, e = self.file.infos[self.key]
        return e - b + (self.scale.nbytes if self.scale else 0)

    def typed(self) -> np.ndarray:
        np_dtype = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", FP8: "u1"}[self.dtype]
        return self.file.bytes_of(self.key).view(np_dtype).reshape(self.shape)

    def values(self, index: tuple[Any, ...]) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(self.shape) - len(index))
        ranges = []
        for s, size in zip(index, self.shape, strict=True):
            if isinstance(s, slice):
                start, stop, step = s.indices(size)
                if step != 1:
                    raise AssertionError("values() takes step-1 slices")
                ranges.append((start, stop))
            else:
                ranges.append((int(s), int(s) + 1))
        sub = self.typed()[tuple(slice(a, b) for a, b in ranges)]
        if self.dtype == "F32":
            out = np.array(sub, dtype=np.float32)
        elif self.dtype == "F16":
            out = sub.astype(np.float32)
        elif self.dtype == "BF16":
            out = (sub.astype(np.uint32) << 16).view(np.float32)
        else:
            out = FP8_TABLE[sub]
            (r0, r1), (c0, c1) = ranges
            if np.isnan(out).any():
                r = r0 + int(np.argwhere(np.isnan(out))[0][0])
                raise SourceError(f"{self.file.path.name}: tensor {self.key}: NaN (e4m3 byte 0x7F/0xFF) in row {r}")
            b0, b1 = self.block
            s = self.scale.values(())  # [ceil(out/B0), ceil(in/B1)]: small
            ri = np.arange(r0, r1) // b0
            ci = np.arange(c0, c1) // b1
            out *= s[ri][:, ci]
        return out.reshape(result_shape(self.shape, index))


@dataclass
class SafetensorsTensor(SourceTensor):
    """A logical (GGUF-named) tensor made of one safetensors tensor, or of one per expert (stacked)."""

    parts: list[_Part] = field(default_factory=list)
    stacked: bool = False
    hf_names: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def has_raw(self) -> bool:
        # BF16/F16/F32 bytes of one tensor are the ggml type's bytes (blocks of one value)
        return not self.stacked and self.dtype in ("F32", "F16", "BF16")

    @property
    def dequantizable(self) -> bool:
        return True

    @property
    def block_k(self) -> int:
        return 1  # values are computed element by element: any cut works

    def raw(self) -> np.ndarray:
        if not self.has_raw:
            raise SourceError(f"{self.file.name}: tensor {self.name} ({self.dtype}) has no ggml bytes to copy")
        p = self.parts[0]
        row = self.shape[-1] * READ_DTYPES[self.dtype]
        return p.file.bytes_of(p.key).reshape(*self.shape[:-1], row)

    def values(self, index: tuple[Any, ...] = ()) -> np.ndarray:
        if not self.stacked:
            return self.parts[0].values(index)
        index = tuple(index) + (slice(None),) * (len(self.shape) - len(index))
        first, rest = index[0], index[1:]
        if isinstance(first, slice):
            start, stop, _ = first.indices(self.shape[0])
            out = [self.parts[e].values(rest) for e in range(start, stop)]
            return np.stack(out) if out else np.zeros(result_shape(self.shape, index), np.float32)
        return self.parts[int(first)].values(rest)


# ------------------------------------------------------------------------------------------ config


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceError(f"{path}: missing ({what})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"{path.name}: not valid JSON ({e})") from None


def check_architecture(c: dict[str, Any], fname: str) -> None:
    mt = c.get("model_type")
    archs = c.get("architectures") or []
    if mt not in MODEL_TYPES and not any(a in ARCHITECTURES for a in archs):
        raise SourceError(
            f"{fname}: model_type {mt!r} (architectures {archs}) is not supported: ktpack reads DeepSeek-V3/R1 "
            f"checkpoints (model_type deepseek_v3)"
        )


def fp8_block(c: dict[str, Any], fname: str) -> tuple[int, int] | None:
    """The FP8 weight block of `quantization_config`, None when the checkpoint is not quantized."""
    q = c.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method != "fp8":
        raise SourceError(
            f"{fname}: quantization_config.quant_method {method!r} is not read (ktpack reads BF16/F16/F32 "
            f"checkpoints and DeepSeek's FP8 e4m3 with block scales)"
        )
    if q.get("fmt", "e4m3") != "e4m3":
        raise SourceError(f"{fname}: quantization_config.fmt {q.get('fmt')!r} is not read (ktpack reads e4m3)")
    block = q.get("weight_block_size", [128, 128])
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise SourceError(f"{fname}: quantization_config.weight_block_size {block!r} is not two positive integers")
    return block[0], block[1]


def config_from_hf(c: dict[str, Any], fname: str) -> ModelConfig:
    def get(key: str, default: Any = ...) -> Any:
        if c.get(key) is not None:
            return c[key]
        if default is ...:
            raise SourceError(f"{fname}: key {key} is missing")
        return default

    rs = c.get("rope_scaling")
    rope_scaling = None
    if rs:
        kind = rs.get("type", rs.get("rope_type"))
        if kind == "yarn":
            rope_scaling = {
                "type": "yarn",
                "factor": float(rs["factor"]),
                "original_max_position_embeddings": int(rs["original_max_position_embeddings"]),
                "beta_fast": float(rs.get("beta_fast", 32.0)),
                "beta_slow": float(rs.get("beta_slow", 1.0)),
                "mscale": float(rs.get("mscale", 1.0)),
                "mscale_all_dim": float(rs.get("mscale_all_dim", 0.0)),
            }
        elif kind not in ("default", None):
            raise SourceError(f"{fname}: rope_scaling type {kind!r} is not supported (ktpack reads yarn or none)")
    rope_theta = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    scoring = get("scoring_func", "sigmoid")
    if scoring not in ("sigmoid", "softmax"):
        raise SourceError(f"{fname}: scoring_func {scoring!r} is not supported (sigmoid or softmax)")

    def token_id(key: str) -> int | None:
        v = c.get(key)
        if isinstance(v, list):
            v = v[0] if v else None
        return int(v) if v is not None else None

    q_lora = c.get("q_lora_rank")
    return ModelConfig(
        vocab_size=int(get("vocab_size")),
        hidden_size=int(get("hidden_size")),
        intermediate_size=int(get("intermediate_size")),
        moe_intermediate_size=int(get("moe_intermediate_size", 0)),
        num_hidden_layers=int(get("num_hidden_layers")),
        num_attention_heads=int(get("num_attention_heads")),
        q_lora_rank=int(q_lora) if q_lora else None,
        kv_lora_rank=int(get("kv_lora_rank")),
        qk_nope_head_dim=int(get("qk_nope_head_dim")),
        qk_rope_head_dim=int(get("qk_rope_head_dim")),
        v_head_dim=int(get("v_head_dim")),
        n_routed_experts=int(get("n_routed_experts", 0)),
        n_shared_experts=int(get("n_shared_experts", 0)),
        num_experts_per_tok=int(get("num_experts_per_tok", 0)),
        n_group=int(get("n_group", 1)),
        topk_group=int(get("topk_group", 1)),
        first_k_dense_replace=int(get("first_k_dense_replace", 0)),
        routed_scaling_factor=float(get("routed_scaling_factor", 1.0)),
        norm_topk_prob=bool(get("norm_topk_prob", False)),
        scoring_func=scoring,
        topk_method=get("topk_method", "noaux_tc" if scoring == "sigmoid" else "greedy"),
        rms_norm_eps=float(get("rms_norm_eps")),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(get("max_position_embeddings")),
        bos_token_id=token_id("bos_token_id"),
        eos_token_id=token_id("eos_token_id"),
        attention_layout="kv_b",
    )


# ------------------------------------------------------------------------------------------ open


def _shard_files(folder: Path, single: Path | None) -> tuple[list[Path], dict[str, str], Path | None]:
    """(shard paths, index weight_map, index path) of a folder or of one .safetensors file."""
    if single is not None:
        return [single], {}, None
    index = folder / INDEX_NAME
    if index.exists():
        doc = _read_json(index, "the shard index")
        wm = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise SourceError(f"{index.name}: no weight_map (tensor name -> shard file)")
        first_of: dict[str, str] = {}
        for name, fname in wm.items():
            if not isinstance(fname, str) or "/" in fname or fname in ("", ".", ".."):
                raise SourceError(f"{index.name}: tensor {name}: shard name {fname!r} is not a file name")
            first_of.setdefault(fname, name)
        for fname, name in sorted(first_of.items()):
            if not (folder / fname).is_file():
                raise SourceError(f"{index.name}: shard {fname} (holding tensor {name}) is missing from {folder.name}/")
        return [folder / f for f in sorted(first_of)], wm, index
    if (folder / SINGLE_NAME).is_file():
        return [folder / SINGLE_NAME], {}, None
    raise SourceError(f"{folder}: neither {INDEX_NAME} nor {SINGLE_NAME} is there (not a safetensors checkpoint)")


def open_safetensors(path: Path | str, header_only_ok: bool = False) -> Source:
    """Open a Hugging Face DeepSeek-V3/R1 folder (or one .safetensors file next to its config.json).
    `header_only_ok`: accept shards that hold only their header (a description of a checkpoint, for
    planning); such a Source has `header_only` set."""
    path = Path(path)
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder")
    folder = path if path.is_dir() else path.parent
    cfg_path = folder / CONFIG_NAME
    c = _read_json(cfg_path, "the model configuration a safetensors checkpoint needs")
    if not isinstance(c, dict):
        raise SourceError(f"{CONFIG_NAME}: not a JSON object")
    check_architecture(c, CONFIG_NAME)
    block = fp8_block(c, CONFIG_NAME)
    config = config_from_hf(c, CONFIG_NAME)
    notes: list[str] = []

    paths, weight_map, index = _shard_files(folder, None if path.is_dir() else path)
    files = [_STFile(p, header_only_ok) for p in paths]
    where: dict[str, _STFile] = {}
    for f in files:
        for name in f.infos:
            if name in where:
                raise SourceError(f"{f.path.name}: tensor {name} is also in {where[name].path.name}")
            where[name] = f
    for name, fname in weight_map.items():
        if name not in where or where[name].path.name != fname:
            raise SourceError(f"{index.name}: tensor {name} is listed in {fname}, whose header does not hold it")

    tensors: dict[str, SourceTensor] = {}
    experts: dict[str, dict[int, _Part]] = {}
    skipped: dict[int, int] = {}
    n_layers = config.num_hidden_layers
    for name in sorted(where):
        f = where[name]
        m = _LAYER.match(name)
        if m and int(m.group(1)) >= n_layers:
            skipped[int(m.group(1))] = skipped.get(int(m.group(1)), 0) + 1
            continue
        if name.endswith(SCALE_SUFFIX):
            if name[: -len(SCALE_SUFFIX)] not in where:
                raise SourceError(f"{f.path.name}: tensor {name} is a scale without its weight")
            continue
        mapped = hf_to_gguf_name(name)
        if mapped is None:
            raise SourceError(f"{f.path.name}: tensor {name} is not a DeepSeek-V3 tensor ktpack knows")
        gname, layer, expert = mapped
        dtype, shape, _, _ = f.infos[name]
        if dtype not in READ_DTYPES:
            raise SourceError(
                f"{f.path.name}: tensor {name} has dtype {dtype}, which no ktpack layout takes "
                f"(ktpack reads F32, F16, BF16 and F8_E4M3 with block scales)"
            )
        part = _Part(f, name, dtype, shape)
        if dtype == FP8:
            part.scale, part.block = _fp8_scale(name, f, shape, where, block)
        if expert is not None:
            experts.setdefault(gname, {})[expert] = part
            continue
        if gname in tensors:
            raise SourceError(f"{f.path.name}: tensor {name} maps to {gname}, which another tensor already gives")
        tensors[gname] = SafetensorsTensor(
            name=gname, shape=shape, dtype=dtype, file=f.path, _raw=None, parts=[part], hf_names=[name]
        )
    for gname, by_e in sorted(experts.items()):
        tensors[gname] = _stack_experts(gname, by_e, config.n_routed_experts)
    if skipped:
        for layer, n in sorted(skipped.items()):
            notes.append(
                f"model.layers.{layer}.* ({n} tensors) skipped: layers >= num_hidden_layers ({n_layers}) hold the "
                f"multi-token-prediction module, which the runtime does not use"
            )
    _check_complete(tensors, config, folder.name)
    if any(t.dtype == FP8 for t in tensors.values()):
        notes.append(
            "FP8 e4m3 weights dequantized with their weight_scale_inv block scales (value = f32(q) * scale_inv) "
            "while converting"
        )
    notes.append(
        "tensor names are llama.cpp's GGUF names mapped from the Hugging Face names (convert/safetensors_source.py "
        "HF_TO_GGUF; model.layers.N.mlp.experts.E.*_proj.weight -> blk.N.ffn_*_exps.weight[E])"
    )

    tok_files: dict[str, bytes] = {}
    for tname in ("tokenizer.json", "tokenizer_config.json"):
        if (folder / tname).is_file():
            tok_files[tname] = (folder / tname).read_bytes()
    if "tokenizer.json" not in tok_files:
        tok_files.clear()
        notes.append("the source has no tokenizer.json: the packed folder has no tokenizer")

    fp_files = [{"name": f.path.name, "size": f.size, "header_sha256": f.header_sha256} for f in files]
    for extra in (cfg_path, index):
        if extra is not None:
            fp_files.append(
                {
                    "name": extra.name,
                    "size": extra.stat().st_size,
                    "sha256": hashlib.sha256(extra.read_bytes()).hexdigest(),
                }
            )
    return Source(
        kind="safetensors",
        files=[f.path for f in files],
        config=config,
        tensors=tensors,
        notes=notes,
        metadata=c,
        _fingerprint={"files": fp_files},
        _tokenizer=tok_files,
        header_only=any(f.header_only for f in files),
    )


def _fp8_scale(
    name: str, f: _STFile, shape: tuple[int, ...], where: dict[str, _STFile], block: tuple[int, int] | None
) -> tuple[_Part, tuple[int, int]]:
    sname = name + SCALE_SUFFIX
    if sname not in where:
        raise SourceError(f"{f.path.name}: tensor {name} is float8_e4m3fn but its block scale {sname} is missing")
    if len(shape) != 2:
        raise SourceError(f"{f.path.name}: tensor {name} is float8_e4m3fn with {len(shape)} dims (expected 2)")
    b = block or (128, 128)
    sf = where[sname]
    sdtype, sshape, _, _ = sf.infos[sname]
    want = (-(-shape[0] // b[0]), -(-shape[1] // b[1]))
    if sshape != want:
        raise SourceError(
            f"{sf.path.name}: tensor {sname} has shape {list(sshape)}, expected {list(want)} "
            f"(ceil of {list(shape)} / {b[0]}x{b[1]} blocks)"
        )
    if sdtype not in SCALE_DTYPES:
        raise SourceError(f"{sf.path.name}: tensor {sname} has dtype {sdtype}, expected F32")
    return _Part(sf, sname, sdtype, sshape), b


def _stack_experts(gname: str, by_e: dict[int, _Part], n_experts: int) -> SafetensorsTensor:
    first = by_e[min(by_e)]
    proj = gname.split(".")[2].split("_")[1]
    layer = gname.split(".")[1]
    for e in range(n_experts):
        if e not in by_e:
            raise SourceError(
                f"{first.file.path.name}: tensor model.layers.{layer}.mlp.experts.{e}.{proj}_proj.weight is "
                f"missing ({gname} needs experts 0..{n_experts - 1})"
            )
    extra = sorted(set(by_e) - set(range(n_experts)))
    if extra:
        p = by_e[extra[0]]
        raise SourceError(f"{p.file.path.name}: tensor {p.key}: expert {extra[0]} >= n_routed_experts {n_experts}")
    parts = [by_e[e] for e in range(n_experts)]
    for p in parts:
        if p.shape != first.shape or p.dtype != first.dtype:
            raise SourceError(
                f"{p.file.path.name}: tensor {p.key} is {p.dtype} {list(p.shape)}, expert 0 is "
                f"{first.dtype} {list(first.shape)}"
            )
    return SafetensorsTensor(
        name=gname, shape=(n_experts, *first.shape), dtype=first.dtype, file=first.file.path, _raw=None,
        parts=parts, stacked=True, hf_names=[p.key for p in parts],
    )  # fmt: skip


def _check_complete(tensors: dict[str, SourceTensor], config: ModelConfig, where: str) -> None:
    """The tensors every DeepSeek-V3 model needs (a checkpoint with some shards left out of the index)."""
    need = ["token_embd.weight", "output_norm.weight", "output.weight"]
    for i in range(config.num_hidden_layers):
        b = f"blk.{i}."
        need += [b + "attn_norm.weight", b + "attn_kv_a_mqa.weight", b + "attn_kv_b.weight", b + "attn_output.weight"]
        if config.is_moe_layer(i):
            need += [b + "ffn_gate_inp.weight", b + f"ffn_{'down'}_exps.weight"]
        else:
            need += [b + "ffn_down.weight"]
    for n in need:
        if n not in tensors:
            raise SourceError(f"{where}: tensor {n} (Hugging Face: {_hf_name_of(n)}) is missing from the checkpoint")


def _hf_name_of(gname: str) -> str:
    for hf, g in GLOBAL_HF_TO_GGUF.items():
        if g == gname:
            return hf
    _, layer, rest = gname.split(".", 2)
    if rest.endswith("_exps.weight"):
        return f"model.layers.{layer}.mlp.experts.*.{rest.split('_')[1]}_proj.weight"
    for hf, g in HF_TO_GGUF.items():
        if g == rest:
            return f"model.layers.{layer}.{hf}"
    return gname
