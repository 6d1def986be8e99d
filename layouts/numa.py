"""NUMA slicing of routed experts along the intermediate dimension (no weight stored twice).

An expert's gate/up weights `[I, H]` are cut along their rows and its down weight `[H, I]` along
its columns, with the same bounds, so node `n` holds rows `lo:hi` of gate/up and columns `lo:hi`
of down and computes a partial down-projection from local memory; the partials are summed.

Bounds fall on multiples of a unit that every layout involved can cut at (the quant block along
K for down, the tile height along N for gate/up). Units are dealt out as evenly as possible; with
more nodes than units some nodes hold an empty slice (they add nothing to the sum).
"""

from __future__ import annotations

import math

MAX_NODES = 8


def split_bounds(size: int, nodes: int, unit: int = 1) -> list[tuple[int, int]]:
    """[(lo, hi)] for each node: contiguous, covering 0..size, cut at multiples of `unit`."""
    if not 1 <= nodes <= MAX_NODES:
        raise ValueError(f"NUMA node count must be 1..{MAX_NODES}, got {nodes}")
    if unit < 1:
        raise ValueError(f"split unit must be >= 1, got {unit}")
    units = math.ceil(size / unit)
    cuts = [min(size, (i * units // nodes) * unit) for i in range(nodes + 1)]
    cuts[-1] = size
    return [(cuts[i], cuts[i + 1]) for i in range(nodes)]


def common_unit(*units: int) -> int:
    return math.lcm(*units) if units else 1
