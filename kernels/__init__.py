"""ktpack.kernels: the native CPU engine (C++, pybind11), chosen per ISA once.

`isa()` is the instruction set the kernels use: the best this CPU and OS allow, or a lower one forced
with KTPACK_ISA=ref|avx2|avx512|amx. Forcing one the machine lacks is refused with the reason.

The engine itself: `Linear(spec)` and `Experts(slices, n_experts, hidden, inter)` over packed bytes as
stored (see `weight_spec`), parallel on a persistent thread pool (KTPACK_THREADS, default: the usable
cores). `ensure_engine()` selects the ISA's kernels the first time the engine is used.
"""

from __future__ import annotations

import os

from . import _native

ISAS = ("ref", "avx2", "avx512", "amx")
ENV = "KTPACK_ISA"


class IsaError(RuntimeError):
    pass


def supported(name: str) -> tuple[bool, str]:
    return _native.isa_supported(name)


def best() -> tuple[str, list[str]]:
    """The best ISA this machine runs, and a line per ISA saying why it was or was not taken."""
    why = []
    chosen = "ref"
    for name in ISAS:
        ok, reason = supported(name)
        why.append(f"{name}: {'yes' if ok else 'no, ' + reason}")
        if ok:
            chosen = name
    return chosen, why


def isa() -> str:
    forced = os.environ.get(ENV)
    if not forced:
        return best()[0]
    if forced not in ISAS:
        raise IsaError(f"{ENV}={forced!r} is not one of {', '.join(ISAS)}")
    ok, reason = supported(forced)
    if not ok:
        raise IsaError(f"{ENV}={forced} cannot run on this machine: {reason}")
    return forced


# Native formats: (layout id, ggml type or None) -> the engine's name for it.
_GGML_FORMATS = {"Q8_0": "ggml_q8_0", "Q4_K": "ggml_q4_k", "Q5_K": "ggml_q5_k", "Q6_K": "ggml_q6_k",
                 "BF16": "ggml_bf16", "F32": "ggml_f32", "Q4_0": "ggml_q4_0", "Q4_1": "ggml_q4_1",
                 "Q5_0": "ggml_q5_0", "Q5_1": "ggml_q5_1"}  # fmt: skip
# Q5_0 / Q4_0 sources are stored as Q8_0 lane blocks (layouts/ggml_lanes.py): the Q8_0 lanes kernel runs them
_LANES_FORMATS = {"Q4_K": "lanes_q4_k", "Q6_K": "lanes_q6_k", "Q8_0": "lanes_q8_0",
                  "Q5_0": "lanes_q8_0", "Q4_0": "lanes_q8_0"}  # fmt: skip
_AMX_FORMATS = {"amx_int4_v1": "amx_int4", "amx_int8_v1": "amx_int8", "amx_bf16_v1": "amx_bf16"}
_selected: str | None = None


def native_format(layout: str, params: dict) -> str | None:
    """The engine's format name for a packed layout, or None when it has no native kernel."""
    if layout == "ggml_rows_v1":
        return _GGML_FORMATS.get(params.get("ggml_type", ""))
    if layout == "ggml_lanes_v1":
        return _LANES_FORMATS.get(params.get("ggml_type", ""))
    return _AMX_FORMATS.get(layout)


def weight_spec(layout: str, params: dict, shape: tuple[int, ...], data) -> tuple:
    """The engine's description of a packed stack `[..., N, K]` whose bytes are `data` (1-D uint8)."""
    fmt = native_format(layout, params)
    if fmt is None:
        raise ValueError(f"layout {layout} {params.get('ggml_type', '')} has no native kernel")
    n, k = int(shape[-2]), int(shape[-1])
    count = 1
    for d in shape[:-2]:
        count *= int(d)
    return (
        fmt,
        data,
        n,
        k,
        count,
        int(params.get("rows", 8)),
        int(params.get("n_block", 4)),
        int(params.get("group_size", 128)),
    )


def ensure_engine() -> str:
    """Select the kernels of `isa()` (once); returns the ISA in use. Raises IsaError when forced wrong."""
    global _selected
    want = isa()
    if _selected != want:
        _native.select_isa(want)
        nodes = _native.machine_nodes()
        if _selected is None and nodes > 1:  # threads grouped and pinned per node
            _native.set_threads(0, nodes)
        _selected = want
    return want


Linear = _native.Linear
Experts = _native.Experts


def machine_report() -> str:
    chosen, why = best()
    forced = os.environ.get(ENV)
    lines = [
        f"ISA: {isa() if forced else chosen}" + (f" (forced by {ENV}={forced})" if forced else " (best available)")
    ]
    lines += [f"  {w}" for w in why]
    nodes = (
        sorted(p for p in os.listdir("/sys/devices/system/node") if p.startswith("node"))
        if os.path.isdir("/sys/devices/system/node")
        else []
    )
    lines.append(f"NUMA nodes: {len(nodes) or 1}" + (f" ({', '.join(nodes)})" if nodes else ""))
    lines.append(f"cores: {os.cpu_count()} logical, {len(os.sched_getaffinity(0))} usable by this process")
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU-only torch or no device)"
    except ImportError:
        gpu = "unknown (torch not installed)"
    lines.append(f"GPU: {gpu}")
    return "\n".join(lines)
