"""Sharded safetensors checkpoints as DeepSeek ships them: BF16, or FP8 e4m3 with 128x128 block scales.

`write_hf_sharded(hf_dir, out_dir, "FP8")` turns the f32 folder of `make_hf_checkpoint` into a folder
like DeepSeek-V3/R1's: `model-0000i-of-0000N.safetensors` shards, `model.safetensors.index.json`,
`config.json` (with `quantization_config` for FP8), `tokenizer.json`, `tokenizer_config.json`.
FP8 is quantized as DeepSeek does (formats.md §4.5): per 128x128 block, `scale_inv = amax / 448`,
`q = e4m3(w / scale_inv)`; the Linear weights of attention, dense MLP, shared and routed experts are
FP8, the rest (embedding, head, norms, router) BF16 and the routing bias F32. Tensors are written
one at a time by `StreamedSafetensors` (also used for the r1-slice, whose tensors are produced in
row chunks), so memory stays bounded.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FP8_MAX = 448.0
BLOCK = 128
_ITEM = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1}


@dataclass
class StEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    produce: Callable[[], Iterable[bytes | np.ndarray]]  # yields the tensor's bytes in order

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEM[self.dtype]


def write_safetensors(
    path: Path, entries: list[StEntry], metadata: dict[str, str] | None = None, header_only: bool = False
) -> int:
    """A safetensors file whose tensors are produced one after another (never all in memory).
    `header_only`: write the header alone (a description of the file; `produce` is not called).
    Returns the size the complete file has."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    off = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [off, off + e.nbytes]}
        off += e.nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    with open(path, "wb") as f:
        f.write(len(body).to_bytes(8, "little") + body)
        for e in [] if header_only else entries:
            n = 0
            for chunk in e.produce():
                b = memoryview(np.ascontiguousarray(chunk) if isinstance(chunk, np.ndarray) else chunk).cast("B")
                f.write(b)
                n += len(b)
            if n != e.nbytes:
                raise AssertionError(f"{e.name}: produced {n} bytes, expected {e.nbytes}")
    return 8 + len(body) + off


def write_sharded(
    out_dir: Path, entries: list[StEntry], shards: int, header_only: bool = False, count_digits: int = 5
) -> list[Path]:
    """`model-0000i-of-0000N.safetensors` (about equal bytes each) and `model.safetensors.index.json`.
    `header_only`: shards hold their headers alone (see `write_safetensors`); `count_digits`: digits
    of N in the file names (DeepSeek's own checkpoints use 6: `model-00001-of-000163.safetensors`)."""
    total = sum(e.nbytes for e in entries)
    groups: list[list[StEntry]] = [[] for _ in range(shards)]
    acc = 0
    for e in entries:
        groups[min(shards - 1, acc * shards // max(total, 1))].append(e)
        acc += e.nbytes
    groups = [g for g in groups if g]
    paths, weight_map = [], {}
    for i, g in enumerate(groups, 1):
        p = out_dir / f"model-{i:05d}-of-{len(groups):0{count_digits}d}.safetensors"
        write_safetensors(p, g, header_only=header_only)
        paths.append(p)
        weight_map.update({e.name: p.name for e in g})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return paths


# ------------------------------------------------------------------------------------------ encoding


def bf16_bytes(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even bf16 bit patterns (uint16) of float32 values."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def quantize_fp8_blocks(w: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek's FP8: (e4m3 bytes uint8 [N, K], scale_inv float32 [ceil(N/b), ceil(K/b)]).

    scale_inv = amax(|block|) / 448 (1 for an all-zero block); q = e4m3(w / scale_inv), round to
    nearest even (torch's cast), |w / scale_inv| <= 448 by construction (clipped against rounding)."""
    import torch

    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    nb, kb = -(-n // block), -(-k // block)
    pad = np.zeros((nb * block, kb * block), np.float32)
    pad[:n, :k] = w
    blocks = np.abs(pad.reshape(nb, block, kb, block)).max(axis=(1, 3))
    scale = np.where(blocks > 0, blocks / np.float32(FP8_MAX), np.float32(1.0)).astype(np.float32)
    full = np.repeat(np.repeat(scale, block, 0), block, 1)[:n, :k]
    x = np.clip(w / full, -FP8_MAX, FP8_MAX)
    q = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    return q, scale


def dequantize_fp8_blocks(q: np.ndarray, scale: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """The reference dequantization (torch's e4m3 decode): f32(q) * scale_inv[i // b, j // b]."""
    import torch

    n, k = q.shape
    v = torch.from_numpy(np.ascontiguousarray(q)).view(torch.float8_e4m3fn).float().numpy()
    return v * np.repeat(np.repeat(scale, block, 0), block, 1)[:n, :k]


def is_fp8_weight(name: str) -> bool:
    """Whether DeepSeek's FP8 checkpoint stores `name` as e4m3: every `*_proj` Linear of a layer
    (attention, dense MLP, shared and routed experts, MTP's eh_proj); not the router `mlp.gate`."""
    return name.startswith("model.layers.") and name.endswith(("_proj.weight", "_proj_with_mqa.weight"))


def storage_dtype(name: str, mode: str) -> str:
    if name.endswith("e_score_correction_bias"):
        return "F32"
    if mode == "FP8" and is_fp8_weight(name):
        return "F8_E4M3"
    return "BF16"


def _entries_from(tensors: Iterator[tuple[str, np.ndarray]], mode: str) -> list[StEntry]:
    out: list[StEntry] = []
    for name, w in tensors:
        dt = storage_dtype(name, mode)
        if dt == "F8_E4M3":
            q, s = quantize_fp8_blocks(w)
            out.append(StEntry(name, dt, q.shape, lambda q=q: [q]))
            out.append(StEntry(name + "_scale_inv", "F32", s.shape, lambda s=s: [s]))
        elif dt == "F32":
            out.append(StEntry(name, dt, w.shape, lambda w=w: [w.astype(np.float32)]))
        else:
            out.append(StEntry(name, dt, w.shape, lambda w=w: [bf16_bytes(w)]))
    return out


def mtp_tensors(cfg_h: int, layer: int, seed: int) -> Iterator[tuple[str, np.ndarray]]:
    """A small stand-in for R1's multi-token-prediction layer (`model.layers.<num_hidden_layers>`)."""
    rng = np.random.default_rng([seed, layer])
    p = f"model.layers.{layer}."
    yield p + "enorm.weight", np.ones(cfg_h, np.float32)
    yield p + "hnorm.weight", np.ones(cfg_h, np.float32)
    yield p + "eh_proj.weight", (0.05 * rng.standard_normal((cfg_h, 2 * cfg_h))).astype(np.float32)
    yield p + "shared_head.norm.weight", np.ones(cfg_h, np.float32)
    yield p + "input_layernorm.weight", np.ones(cfg_h, np.float32)


def write_hf_sharded(
    hf_dir: str | Path, out_dir: str | Path, mode: str = "BF16", shards: int = 3, mtp: bool = True
) -> Path:
    """The f32 folder of `make_hf_checkpoint` as DeepSeek's sharded BF16 or FP8 checkpoint (see module doc)."""
    from safetensors import safe_open

    if mode not in ("BF16", "FP8"):
        raise ValueError(f"mode must be BF16 or FP8, got {mode!r}")
    hf_dir, out = Path(hf_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((hf_dir / "config.json").read_text())
    st = safe_open(str(hf_dir / "model.safetensors"), framework="numpy")

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for name in st.keys():  # noqa: SIM118 (safe_open is no dict)
            yield name, np.asarray(st.get_tensor(name), dtype=np.float32)
        if mtp:
            yield from mtp_tensors(cfg["hidden_size"], cfg["num_hidden_layers"], 7)

    write_sharded(out, _entries_from(tensors(), mode), shards)
    cfg = dict(cfg)
    cfg["torch_dtype"] = "bfloat16"
    if mtp:
        cfg["num_nextn_predict_layers"] = 1
    if mode == "FP8":
        cfg["quantization_config"] = {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [BLOCK, BLOCK],
        }
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (hf_dir / name).exists():
            shutil.copyfile(hf_dir / name, out / name)
    return out


def dequantized_state(folder: str | Path) -> dict[str, np.ndarray]:
    """float32 values of every tensor of a sharded checkpoint, FP8 dequantized with torch (the oracle
    the tests compare with; independent of the reader's own e4m3 table)."""
    from safetensors import safe_open

    folder = Path(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    out: dict[str, np.ndarray] = {}
    for fname in sorted(set(index.values())):
        with safe_open(str(folder / fname), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                t = f.get_tensor(name)
                if name.endswith("_scale_inv"):
                    continue
                if str(t.dtype) == "torch.float8_e4m3fn":
                    with safe_open(str(folder / index[name + "_scale_inv"]), framework="pt") as g:
                        s = g.get_tensor(name + "_scale_inv").numpy()
                    out[name] = dequantize_fp8_blocks(t.view(__import__("torch").uint8).numpy(), s)
                else:
                    out[name] = t.float().numpy()
    return out
