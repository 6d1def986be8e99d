"""ktpack.kernels: the native CPU engine (C++, pybind11), chosen per ISA at import.

`isa()` is the instruction set the kernels use: the best this CPU and OS allow, or a lower one forced
with KTPACK_ISA=ref|avx2|avx512|amx. Forcing one the machine lacks is refused with the reason.
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
