"""Load a packed folder for the runtime: CPU shards memory-mapped, GPU-side tensors in memory.

`load_pack(folder)` reads `manifest.json` (refusing another format major), checks every file's
size against the manifest (and, with `verify=True`, the checksums), and returns a `Pack`:

- CPU shards (`cpu/*.bin`) are memory-mapped read-only (`np.memmap(mode="r")`, a shared file
  mapping): their pages belong to the page cache and are faulted in on first use, never copied
  into private memory. The mappings ask for 2 MiB pages (MADV_HUGEPAGE): where the kernel reads a
  shard into the page cache through them (Linux with large-folio file systems such as ext4), it uses
  2 MiB folios mapped by single page-table entries, fewer TLB misses while decode streams the weights
  (bench-Q4_K_M's shards so cached vs a copy in 4 KiB pages, 8 alternations: 31.3-33.0 vs 30.1-31.4
  GB/s with the read-bandwidth probe; kt-run decode within the host's noise). Pages already cached in
  small folios (a file just written, e.g.) stay as they are until the kernel drops them.
  How to check: read `RssAnon` and `RssFile` in `/proc/self/status` before
  and after `load_pack` (and after a forward): `RssAnon` grows by the GPU-side tensors only, small
  next to the shard bytes; touched shard pages show up in `RssFile` (tests/test_runtime_forward.py
  measures this).
- GPU-side tensors (the safetensors pieces: plain f32/bf16, Marlin) are read into float32 torch
  tensors in CPU memory; Marlin is dequantized once, here, into a dense float32 weight.
- The legacy attention layout (one `attn_kv_b` per block) is split once at load into the current
  `attn_k_b` `[H, kv_lora, nope]` and `attn_v_b` `[H, v, kv_lora]` (formats.md §4.4), so the model
  only ever sees the split form.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import torch

from ..layouts import ids as L
from ..layouts import manifest as mf
from ..layouts import marlin, plain
from ..layouts.config import ModelConfig
from ..layouts.errors import ManifestError
from ..layouts.manifest import Manifest, Piece, TensorEntry
from ..layouts.tensor_io import verify as verify_folder
from . import cpu_ops
from .cpu_ops import CpuExperts, CpuLinear, DenseExperts, ExpertSlice

_EXPERT_PARTS = ("gate", "up", "down")


def _check_files(folder: Path, m: Manifest, checksums: bool) -> None:
    problems = list(verify_folder(folder, m, checksums=checksums))
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        first = problems[0]
        if first.endswith(": missing"):
            first += " (a shard listed in the manifest is absent)"
        raise ManifestError(f"{folder}/{first}{more}")


def ask_huge_pages(mm: mmap.mmap | None) -> None:
    """MADV_HUGEPAGE on a mapping (the shards here, the KV cache in model.py); a no-op where the OS has no
    such advice or refuses it (transparent huge pages compiled out or disabled)."""
    if mm is None or not hasattr(mmap, "MADV_HUGEPAGE"):
        return
    try:
        mm.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        pass


class Pack:
    """The weights of a packed folder, as the model reads them (see the module docstring)."""

    def __init__(self, folder: Path, manifest: Manifest, engine: str | None = None) -> None:
        self.folder = folder
        self.engine = cpu_ops.engine_choice(engine)  # "native" or "ref" (the oracle)
        self.manifest = manifest
        self.config: ModelConfig = manifest.config
        self.entries: dict[str, TensorEntry] = {t.name: t for t in manifest.tensors}
        self._maps: dict[str, np.memmap] = {}
        self._dense: dict[str, torch.Tensor] = {}  # GPU-side tensors and tensors derived at load
        self._linears: dict[str, CpuLinear] = {}
        for t in manifest.tensors:
            if t.placement != "cpu":
                self._dense[t.name] = self._load_gpu_side(t)
        for f in manifest.files:
            if f.kind == "cpu_shard":
                self._maps[f.path] = np.memmap(folder / f.path, dtype=np.uint8, mode="r")
                ask_huge_pages(getattr(self._maps[f.path], "_mmap", None))
                if self.engine == "native" and f.node is not None:
                    from .. import kernels  # each node's shard in its own memory (no-op on one node)

                    kernels._native.bind_to_node(self._maps[f.path], int(f.node))
        if self.config.attention_layout == "kv_b" or any(n.endswith(".attn_kv_b.weight") for n in self.entries):
            self._split_kv_b()

    # ------------------------------------------------------------------ loading

    def piece_bytes(self, p: Piece) -> np.ndarray:
        """The bytes of a CPU piece: a read-only view into the shard's memory map (no copy)."""
        if p.nbytes == 0:
            return np.zeros(0, np.uint8)
        return self._maps[p.file][p.offset : p.offset + p.nbytes]

    def _read_piece(self, p: Piece) -> np.ndarray:
        with open(self.folder / p.file, "rb") as f:
            f.seek(p.offset)
            buf = f.read(p.nbytes)
        if len(buf) != p.nbytes:
            raise ManifestError(f"{self.folder / p.file}: short read of tensor piece {p.key or p.part}")
        return np.frombuffer(buf, np.uint8)

    def _load_gpu_side(self, t: TensorEntry) -> torch.Tensor:
        shape = tuple(int(d) for d in t.shape)
        if t.layout == L.PLAIN:
            if len(t.pieces) != 1:
                raise ManifestError(f"{self.folder}: GPU-side tensor {t.name} has {len(t.pieces)} pieces, expected 1")
            vals = plain.unpack(self._read_piece(t.pieces[0]), shape, t.params["dtype"])
        elif t.layout == L.MARLIN_INT4:
            parts = {p.part: p for p in t.pieces}
            *lead, n, k = shape
            g = t.params["group_size"]
            gk = k if g == -1 else g
            qw = self._read_piece(parts["qweight"]).view(np.int32).reshape(*lead, k // 16, 2 * n)
            sc = self._read_piece(parts["scales"]).view(np.float16).reshape(*lead, k // gk, n)
            vals = marlin.dequantize(qw, sc, shape, g)
        else:
            raise ManifestError(f"{self.folder}: GPU-side tensor {t.name} has layout {t.layout}, not plain or Marlin")
        return torch.from_numpy(np.ascontiguousarray(vals, dtype=np.float32).reshape(shape))

    def _split_kv_b(self) -> None:
        c = self.config
        h, nope, v = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim
        for name in [n for n in self.entries if n.endswith(".attn_kv_b.weight")]:
            kv_b = self._full(name)  # [H * (nope + v), kv_lora]
            kv = kv_b.reshape(h, nope + v, kv_b.shape[-1])
            prefix = name[: -len("attn_kv_b.weight")]
            self._dense[prefix + "attn_k_b.weight"] = kv[:, :nope, :].transpose(1, 2).contiguous()
            self._dense[prefix + "attn_v_b.weight"] = kv[:, nope:, :].contiguous()
            self._dense.pop(name, None)

    def _full(self, name: str) -> torch.Tensor:
        if name in self._dense:
            return self._dense[name]
        t = self.entry(name)
        if t.split_axis is not None and len(t.pieces) > 1:
            parts = [
                torch.from_numpy(cpu_ops.dequant_matrix(t, self.piece_bytes(p), p.shape))
                for p in sorted(t.pieces, key=lambda p: p.node or 0)
            ]
            return torch.cat(parts, dim=t.split_axis)
        p = t.pieces[0]
        return torch.from_numpy(np.ascontiguousarray(cpu_ops.dequant_matrix(t, self.piece_bytes(p), t.shape)))

    # ------------------------------------------------------------------ the model's view

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise KeyError(f"{self.folder}: the pack has no tensor {name}") from None

    def has(self, name: str) -> bool:
        return name in self._dense or name in self.entries

    def dense(self, name: str) -> torch.Tensor:
        """Float32 tensor in its logical shape (norms, router, bias, GPU-side or small tensors).

        GPU-side and derived tensors are returned as loaded; a CPU tensor is dequantized now
        (the caller keeps it: nothing is cached here)."""
        return self._full(name)

    def linear(self, name: str) -> CpuLinear | torch.Tensor:
        """A weight `[..., N, K]`: a dense float32 tensor (GPU side, or derived at load), or a
        `CpuLinear` over the memory-mapped packed bytes."""
        if name in self._dense:
            return self._dense[name]
        if name not in self._linears:
            t = self.entry(name)
            if len(t.pieces) != 1:
                raise ManifestError(f"{self.folder}: CPU linear {t.name} has {len(t.pieces)} pieces, expected 1")
            self._linears[name] = cpu_ops.make_linear(t, self.piece_bytes(t.pieces[0]), self.engine)
        return self._linears[name]

    def experts(self, layer: int) -> CpuExperts | DenseExperts:
        """The routed experts of block `layer` (gate/up/down), per NUMA slice."""
        names = [f"blk.{layer}.ffn_{p}_exps.weight" for p in _EXPERT_PARTS]
        entries = [self.entry(n) for n in names]
        if any(t.placement != "cpu" for t in entries):
            gate, up, down = (self._full(n) for n in names)
            return DenseExperts(gate, up, down)
        gate, up, down = entries
        n_exp = int(gate.shape[0])
        inter = int(gate.shape[1])
        bounds = gate.split_bounds or [[0, inter]]

        def by_node(t: TensorEntry) -> dict[int, Piece]:
            return {(p.node or 0): p for p in t.pieces}

        gp, upp, dp = by_node(gate), by_node(up), by_node(down)
        slices = []
        for node, (lo, hi) in enumerate(bounds):
            if node not in gp or node not in upp or node not in dp:
                raise ManifestError(f"{self.folder}: block {layer} experts have no piece for NUMA node {node}")
            slices.append(
                ExpertSlice(
                    node=node,
                    lo=int(lo),
                    hi=int(hi),
                    gate=(gate, self.piece_bytes(gp[node]), tuple(gp[node].shape)),
                    up=(up, self.piece_bytes(upp[node]), tuple(upp[node].shape)),
                    down=(down, self.piece_bytes(dp[node]), tuple(dp[node].shape)),
                )
            )
        return cpu_ops.make_experts(layer, n_exp, slices, self.engine)

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of token_embd, dequantized now, float32 `[T, hidden]`."""
        name = "token_embd.weight"
        if name in self._dense:
            return self._dense[name][ids]
        t = self.entry(name)
        data = self.piece_bytes(t.pieces[0])
        n, k = (int(d) for d in t.shape)
        idx = ids.reshape(-1).tolist()
        if t.layout != L.GGML_ROWS:
            full = cpu_ops.dequant_matrix(t, data, t.shape)
            return torch.from_numpy(np.ascontiguousarray(full[idx]))
        from ..layouts import ggml

        bad = [r for r in idx if not 0 <= r < n]
        if bad:
            raise IndexError(f"token id {bad[0]} outside the vocabulary (0..{n - 1})")
        gtype = t.params["ggml_type"]
        raw = ggml.gather_rows(data, (n, k), gtype, np.asarray(idx, np.int64), int(t.params["rows"]))
        out = torch.from_numpy(ggml.dequantize(raw, gtype).reshape(len(idx), k))
        return out.reshape(*ids.shape, k)

    def close(self) -> None:
        self._maps.clear()
        self._linears.clear()


def load_pack(folder: Path | str, verify: bool = False, engine: str | None = None) -> Pack:
    """Open a packed folder (see the module docstring). Raises ManifestError, one line naming the
    file, for another format major, a missing or short file, or (verify=True) a bad checksum."""
    folder = Path(folder)
    m = mf.load(folder)
    _check_files(folder, m, checksums=verify)
    return Pack(folder, m, engine)
