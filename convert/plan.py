"""The planner: source tensors + placement rules + options -> a layout and a place for every tensor.

Nothing is written here. The plan is a complete manifest minus checksums: every tensor's layout,
and every piece's file, offset and byte count. `--plan` prints it; the writer fills it in.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from ktpack.layouts import amx, ggml, ggml_lanes, marlin, numa, plain
from ktpack.layouts import ids as L
from ktpack.layouts.manifest import FileEntry, Manifest, Piece, TensorEntry

from .source import Source, SourceTensor

GIB = 1 << 30
VERSION = "0.1.0"


class PlanError(ValueError):
    """The source cannot be converted with these options; the message says why and what to do."""


@dataclass(frozen=True)
class ConvertOptions:
    target: str = "gpu"  # gpu | cpu
    cpu_layout: str = "ggml"  # ggml | ggml-rows | amx-int4 | amx-int8 | amx-bf16
    gpu_layout: str = "marlin"  # marlin | bf16
    numa_nodes: int = 1
    gpu_mem: float | None = None  # GiB budget for GPU-side tensors
    cpu_mem: float | None = None  # GiB budget for all CPU shards together
    group_size: int = 128  # amx-int4 group size along K
    rules: str | None = None  # a placement rules TOML; None = the DeepSeek-V3 default

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class Rule:
    patterns: list[str]
    role: str


ROLES = ("routed_expert", "small", "embedding", "linear")


def load_rules(path: str | None) -> list[Rule]:
    if path is None:
        text = resources.files("ktpack.layouts").joinpath("placement_deepseek_v3.toml").read_text()
        where = "placement_deepseek_v3.toml"
    else:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise PlanError(f"{path}: cannot read placement rules ({e.strerror})") from None
        where = path
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PlanError(f"{where}: not valid TOML ({e})") from None
    rules = []
    for r in doc.get("rule", []):
        if r.get("role") not in ROLES or not isinstance(r.get("match"), list):
            raise PlanError(f"{where}: each [[rule]] needs match = [patterns] and role in {ROLES}")
        rules.append(Rule(list(r["match"]), r["role"]))
    return rules


def role_of(name: str, rules: list[Rule]) -> str:
    for r in rules:
        if any(fnmatch.fnmatchcase(name, p) for p in r.patterns):
            return r.role
    raise PlanError(f"tensor {name}: no placement rule matches it")


_BLK = re.compile(r"^blk\.(\d+)\.")


def layer_of(name: str) -> int | None:
    m = _BLK.match(name)
    return int(m.group(1)) if m else None


def _sort_key(name: str) -> tuple[int, str]:
    layer = layer_of(name)
    return (-1 if layer is None else layer, name)


@dataclass
class PlannedTensor:
    entry: TensorEntry
    src: SourceTensor
    # one slice per piece group: (node, axis, lo, hi) or None for the whole tensor
    slices: list[tuple[int | None, int | None, int, int]] = field(default_factory=list)


@dataclass
class Plan:
    manifest: Manifest
    tensors: list[PlannedTensor]
    shard_headers: dict[str, bytes]  # CPU shard path -> header bytes (at offset 0)
    st_headers: dict[str, bytes]  # safetensors path -> header bytes (at offset 0)
    aux_files: dict[str, bytes]  # tokenizer files

    def plan_hash(self) -> str:
        return hashlib.sha256(self.manifest.to_json().encode()).hexdigest()

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.manifest.tensors:
            for p in t.pieces:
                key = "gpu" if t.placement == "gpu" else f"node{p.node}"
                out[key] = out.get(key, 0) + p.nbytes
        return out


def _cpu_layout_for(
    dtype: str, opts: ConvertOptions, name: str, role: str, shape: tuple[int, ...]
) -> tuple[str, dict[str, Any]]:
    layout = L.CPU_LAYOUT_CHOICES[opts.cpu_layout]
    if layout == L.GGML_ROWS:
        if dtype not in ggml.SUPPORTED_TYPES:
            raise PlanError(
                f"tensor {name}: type {dtype} is not taken by the ggml layout; re-quantize it with "
                f"--cpu-layout amx-int4 (or amx-int8, amx-bf16)"
            )
        if opts.cpu_layout == "ggml" and ggml_lanes.supports(shape, dtype) is None:
            return L.GGML_LANES, {"ggml_type": dtype, "rows": L.GGML_LANES_ROWS}
        if opts.cpu_layout == "ggml" and dtype == "BF16" and amx.supports("bf16", shape) is None:
            # the bf16 tiles hold a BF16 source's values exactly, and prefill runs 2-2.5x faster on them
            return L.AMX_BF16, {"n_block": L.AMX_N_BLOCK}
        return layout, {"ggml_type": dtype, "rows": L.GGML_ROWS_PER_GROUP}
    params: dict[str, Any] = {"n_block": L.AMX_N_BLOCK}
    if layout == L.AMX_INT4:
        params["group_size"] = opts.group_size
    return layout, params


def _amx_kind(layout: str) -> str:
    return {L.AMX_BF16: "bf16", L.AMX_INT8: "int8", L.AMX_INT4: "int4"}[layout]


def _amx_supports(layout: str, params: dict[str, Any], shape: tuple[int, ...]) -> str | None:
    return amx.supports(_amx_kind(layout), shape, **params)


def layout_nbytes(layout: str, params: dict[str, Any], shape: tuple[int, ...]) -> dict[str, int]:
    """Bytes of each part of a tensor (slice) of logical `shape` in `layout`."""
    if any(d == 0 for d in shape):
        return {"data": 0} if layout != L.MARLIN_INT4 else {"qweight": 0, "scales": 0}
    if layout == L.PLAIN:
        return {"data": plain.nbytes(shape, params["dtype"])}
    if layout == L.GGML_ROWS:
        return {"data": ggml.nbytes(shape, params["ggml_type"])}
    if layout == L.GGML_LANES:
        return {"data": ggml_lanes.nbytes(shape, params["ggml_type"])}
    if layout in (L.AMX_BF16, L.AMX_INT8, L.AMX_INT4):
        return {"data": amx.nbytes(_amx_kind(layout), shape, **params)}
    if layout == L.MARLIN_INT4:
        *lead, n, k = shape
        g = params["group_size"]
        m = math.prod(lead)
        return {"qweight": m * (k // 16) * 2 * n * 4, "scales": m * (k // g) * n * 2}
    raise AssertionError(layout)


def part_dtype_shape(layout: str, params: dict[str, Any], shape: tuple[int, ...], part: str) -> tuple[str, list[int]]:
    """safetensors dtype and shape of a GPU-side part."""
    if layout == L.PLAIN:
        return {"f32": "F32", "f16": "F16", "bf16": "BF16"}[params["dtype"]], list(shape)
    if layout == L.MARLIN_INT4:
        *lead, n, k = shape
        if part == "qweight":
            return "I32", [*lead, k // 16, 2 * n]
        return "F16", [*lead, k // params["group_size"], n]
    raise AssertionError(layout)


def _expert_unit(source: Source, layer_prefix: str, layouts: dict[str, tuple[str, dict[str, Any]]]) -> int:
    """The intermediate-dim granularity at which all three expert tensors of a layer can be cut."""
    units = [L.TILE_N]
    for proj in ("gate", "up", "down"):
        name = f"{layer_prefix}ffn_{proj}_exps.weight"
        if name not in layouts:
            continue
        layout, params = layouts[name]
        if proj == "down":  # cut along K: on the source's blocks (they are read) and the layout's tiles
            units.append(source.tensors[name].block_k)
            if layout in L.AMX_K_PER_TILE:
                units.append(L.AMX_K_PER_TILE[layout])
    return numa.common_unit(*units)


def make_plan(source: Source, opts: ConvertOptions) -> Plan:
    if opts.target not in ("gpu", "cpu"):
        raise PlanError(f"--target must be gpu or cpu, got {opts.target!r}")
    if opts.cpu_layout not in L.CPU_LAYOUT_CHOICES:
        raise PlanError(f"--cpu-layout must be one of {', '.join(L.CPU_LAYOUT_CHOICES)}, got {opts.cpu_layout!r}")
    if not 1 <= opts.numa_nodes <= numa.MAX_NODES:
        raise PlanError(f"--numa-nodes must be 1..{numa.MAX_NODES}, got {opts.numa_nodes}")
    if opts.group_size not in (32, 64, 128):
        raise PlanError(f"--group-size must be 32, 64 or 128, got {opts.group_size}")
    if opts.cpu_layout in ("ggml", "ggml-rows") and source.kind != "gguf":
        raise PlanError(
            f"--cpu-layout {opts.cpu_layout} keeps a GGUF's quant blocks as they are; a {source.kind} source has none: "
            f"use --cpu-layout amx-int4 (the default for {source.kind}), amx-int8 or amx-bf16"
        )
    rules = load_rules(opts.rules)
    notes = list(source.notes)
    names = sorted(source.tensors, key=_sort_key)

    # 1. layout of every tensor
    decided: dict[str, tuple[str, str, str, dict[str, Any]]] = {}  # name -> (role, placement, layout, params)
    expert_layouts: dict[str, tuple[str, dict[str, Any]]] = {}
    for name in names:
        st = source.tensors[name]
        role = role_of(name, rules)
        shape = st.shape
        if not st.dequantizable:
            raise PlanError(
                f"tensor {name}: type {st.dtype} is not supported (no ktpack layout stores it and it "
                f"cannot be re-quantized)"
            )
        if role == "small":
            decided[name] = (role, "gpu", L.PLAIN, {"dtype": "f32"})
        elif role == "routed_expert":
            if len(shape) != 3:
                raise PlanError(
                    f"tensor {name}: routed experts must be stacked [experts, rows, cols], got {list(shape)}"
                )
            layout, params = _cpu_layout_for(st.dtype, opts, name, role, shape)
            decided[name] = (role, "cpu", layout, params)
            expert_layouts[name] = (layout, params)
        elif role == "embedding":
            if st.dtype in ggml.SUPPORTED_TYPES and st.has_raw:
                decided[name] = (
                    role,
                    "cpu",
                    L.GGML_ROWS,
                    {"ggml_type": st.dtype, "rows": L.GGML_ROWS_PER_GROUP},
                )
            else:
                decided[name] = (role, "cpu", L.PLAIN, {"dtype": "bf16"})
        else:  # linear
            if opts.target == "gpu":
                reason = marlin.supports(shape, 128) if opts.gpu_layout == "marlin" else "--gpu-layout bf16"
                if reason is None:
                    decided[name] = (role, "gpu", L.MARLIN_INT4, {"group_size": L.MARLIN_GROUP})
                else:
                    if opts.gpu_layout == "marlin":
                        notes.append(f"{name}: stored as bf16 on the GPU side ({reason})")
                    decided[name] = (role, "gpu", L.PLAIN, {"dtype": "bf16"})
            else:
                layout, params = _cpu_layout_for(st.dtype, opts, name, role, shape)
                if layout not in (L.GGML_ROWS, L.GGML_LANES):
                    reason = _amx_supports(layout, params, shape)
                    if reason is not None:
                        notes.append(f"{name}: stored as plain bf16 on the CPU ({reason})")
                        layout, params = L.PLAIN, {"dtype": "bf16"}
                decided[name] = (role, "cpu", layout, params)

    # 2. pieces (NUMA slices for routed experts), grouped into files
    planned: list[PlannedTensor] = []
    file_pieces: dict[str, list[tuple[PlannedTensor, Piece]]] = {}
    file_node: dict[str, int | None] = {}
    for name in names:
        st = source.tensors[name]
        role, placement, layout, params = decided[name]
        layer = layer_of(name)
        stem = "global" if layer is None else f"blk.{layer}"
        entry = TensorEntry(
            name=name, shape=list(st.shape), source_dtype=st.dtype, placement=placement,
            role=role, layout=layout, params=params,
        )  # fmt: skip
        pt = PlannedTensor(entry=entry, src=st)
        if role == "routed_expert":
            unit = _expert_unit(source, f"{stem}.", expert_layouts)
            axis = 2 if "ffn_down_exps" in name else 1
            size = st.shape[axis]
            bounds = numa.split_bounds(size, opts.numa_nodes, unit)
            entry.split_axis = axis
            entry.split_bounds = [list(b) for b in bounds]
            for node, (lo, hi) in enumerate(bounds):
                shp = list(st.shape)
                shp[axis] = hi - lo
                if layout not in (L.GGML_ROWS, L.GGML_LANES) and hi > lo:
                    reason = _amx_supports(layout, params, tuple(shp))
                    if reason:
                        raise PlanError(
                            f"tensor {name}: node {node} slice {shp} cannot be stored as {layout}: {reason}"
                        )
                pt.slices.append((node, axis, lo, hi))
                for part, nb in layout_nbytes(layout, params, tuple(shp)).items():
                    fname = f"cpu/{stem}.node{node}.bin"
                    piece = Piece(file=fname, offset=0, nbytes=nb, shape=shp, part=part, node=node)
                    entry.pieces.append(piece)
                    file_pieces.setdefault(fname, []).append((pt, piece))
                    file_node[fname] = node
        else:
            pt.slices.append((0 if placement == "cpu" else None, None, 0, 0))
            for part, nb in layout_nbytes(layout, params, st.shape).items():
                if placement == "cpu":
                    fname = f"cpu/{stem}.node0.bin"
                    piece = Piece(file=fname, offset=0, nbytes=nb, shape=list(st.shape), part=part, node=0)
                    file_node[fname] = 0
                else:
                    fname = f"gpu/{stem}.safetensors"
                    dtype, _ = part_dtype_shape(layout, params, st.shape, part)
                    key = name if part == "data" else f"{name}.{part}"
                    piece = Piece(
                        file=fname, offset=0, nbytes=nb, shape=list(st.shape), part=part, key=key, dtype=dtype
                    )
                    file_node[fname] = None
                entry.pieces.append(piece)
                file_pieces.setdefault(fname, []).append((pt, piece))
        planned.append(pt)

    # 3. offsets
    files: list[FileEntry] = []
    shard_headers: dict[str, bytes] = {}
    st_headers: dict[str, bytes] = {}
    for fname in sorted(file_pieces, key=_file_sort_key):
        pieces = file_pieces[fname]
        if fname.endswith(".safetensors"):
            header, size = _layout_safetensors(pieces)
            st_headers[fname] = header
            files.append(FileEntry(path=fname, size=size, kind="safetensors"))
        else:
            header, size = _layout_shard(fname, pieces)
            shard_headers[fname] = header
            files.append(FileEntry(path=fname, size=size, kind="cpu_shard", node=file_node[fname]))

    aux = dict(source.tokenizer_files())
    for aname, content in sorted(aux.items()):
        files.append(
            FileEntry(path=aname, size=len(content), kind="tokenizer", sha256=hashlib.sha256(content).hexdigest())
        )
    manifest = Manifest(
        config=source.config,
        source={"kind": source.kind, **source.fingerprint()},
        options=opts.as_dict(),
        files=files,
        tensors=[pt.entry for pt in planned],
        notes=notes,
        created_by=f"ktpack {VERSION}",
    )
    return Plan(manifest=manifest, tensors=planned, shard_headers=shard_headers, st_headers=st_headers, aux_files=aux)


def _file_sort_key(fname: str) -> tuple[int, int, str]:
    m = re.search(r"blk\.(\d+)", fname)
    return (0 if fname.startswith("gpu/") else 1, -1 if m is None else int(m.group(1)), fname)


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def _layout_shard(fname: str, pieces: list[tuple[PlannedTensor, Piece]]) -> tuple[bytes, int]:
    """CPU shard: a header (magic, version, JSON table) padded to a page, then page-aligned pieces."""
    table = [{"tensor": pt.entry.name, "part": p.part, "nbytes": p.nbytes} for pt, p in pieces]
    # Offsets depend on the header length and the header lists the offsets: iterate to a fixpoint.
    hdr_pages = 1
    while True:
        off = hdr_pages * L.SHARD_ALIGN
        for (_, p), row in zip(pieces, table, strict=True):
            p.offset = off
            row["offset"] = off
            off = _align(off + p.nbytes, L.SHARD_ALIGN)
        body = json.dumps({"file": fname, "pieces": table}, separators=(",", ":")).encode()
        head = L.SHARD_MAGIC + L.FORMAT_MAJOR.to_bytes(4, "little") + L.FORMAT_MINOR.to_bytes(4, "little")
        head += len(body).to_bytes(8, "little") + body
        need = _align(len(head), L.SHARD_ALIGN) // L.SHARD_ALIGN
        if need <= hdr_pages:
            return head.ljust(hdr_pages * L.SHARD_ALIGN, b"\0"), off
        hdr_pages = need


def _layout_safetensors(pieces: list[tuple[PlannedTensor, Piece]]) -> tuple[bytes, int]:
    """A standard safetensors file: u64 header length, JSON header (space-padded to 8), data."""
    meta: dict[str, Any] = {"__metadata__": {"format": "ktpack"}}
    off = 0
    ordered = sorted(pieces, key=lambda tp: tp[1].key or "")
    for pt, p in ordered:
        _, shape = part_dtype_shape(pt.entry.layout, pt.entry.params, tuple(p.shape), p.part)
        meta[p.key] = {"dtype": p.dtype, "shape": shape, "data_offsets": [off, off + p.nbytes]}
        p.offset = off
        off += p.nbytes
    body = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
    body = body.ljust(_align(len(body), 8), b" ")
    base = 8 + len(body)
    for _, p in ordered:
        p.offset += base
    return len(body).to_bytes(8, "little") + body, base + off
