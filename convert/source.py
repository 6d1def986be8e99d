"""What a source reader gives the planner and writer: lazy tensors plus the model's metadata.

A reader (GGUF, safetensors) yields `SourceTensor`s whose bytes stay in the memory-mapped source
until asked for, one slice at a time, so conversion streams. Two ways to read a tensor:

- `raw()`: the source's own bytes `(*shape[:-1], row_bytes)` in a ggml type. Only the lossless
  layouts (`ggml_rows_v1`) use it; a tensor without GGUF-compatible bytes (`has_raw` false: FP8
  with block scales, experts stacked from separate tensors) cannot go there.
- `values(index)`: float32 values of a logical index; the layouts that re-quantize use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ktpack.layouts import ggml
from ktpack.layouts.config import ModelConfig


class SourceError(ValueError):
    """A source file cannot be read: the message names the file and what is wrong."""


@dataclass
class SourceTensor:
    name: str
    shape: tuple[int, ...]  # numpy order: (..., rows, row_length)
    dtype: str  # ggml type name ("Q4_K", "F32", "BF16", ...)
    file: Path
    # uint8 view, shape (*shape[:-1], row_bytes), backed by the mmapped file; None for a tensor of
    # a header-only description (planning only: `nbytes` is then given)
    _raw: np.ndarray | None
    _nbytes: int | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the source that hold this tensor (what a conversion reads)."""
        return int(self._raw.size) if self._raw is not None else int(self._nbytes or 0)

    @property
    def has_raw(self) -> bool:
        """Whether the source stores this tensor as bytes of the ggml type `dtype`, which the lossless
        layouts copy (True for every GGUF tensor, also in a header-only description)."""
        return True

    @property
    def dequantizable(self) -> bool:
        return self.dtype in ggml.DEQUANTIZABLE

    @property
    def block_k(self) -> int:
        """Values per source block along the last axis: a cut along K must fall on a multiple."""
        return ggml.block_geometry(self.dtype)[0]

    def raw(self) -> np.ndarray:
        """Source bytes, uint8 (*shape[:-1], row_bytes); a view into the mapped file."""
        if self._raw is None:
            raise SourceError(
                f"{self.file.name}: tensor {self.name}: the source holds no data for it (a header-only "
                f"description can only be planned)"
            )
        return self._raw

    def values(self, index: tuple[Any, ...] = ()) -> np.ndarray:
        """Float32 values of the logical `index` (ints and step-1 slices over the logical axes; a
        slice of the last axis must fall on multiples of `block_k`)."""
        out = ggml.dequantize(self.raw()[self._raw_index(index)], self.dtype)
        return out.reshape(result_shape(self.shape, index))

    def _raw_index(self, index: tuple[Any, ...]) -> tuple[Any, ...]:
        if len(index) < len(self.shape):
            return index
        *head, last = index
        if isinstance(last, slice) and last != slice(None):
            bv, bb = ggml.block_geometry(self.dtype)
            start, stop, _ = last.indices(self.shape[-1])
            assert start % bv == 0 and stop % bv == 0, "K cut must fall on block boundaries"
            last = slice(start // bv * bb, stop // bv * bb)
        return (*head, last)


def result_shape(shape: tuple[int, ...], index: tuple[Any, ...]) -> tuple[int, ...]:
    """numpy's shape of `array_of(shape)[index]` for ints and slices."""
    out = []
    for i, size in enumerate(shape):
        s = index[i] if i < len(index) else slice(None)
        if isinstance(s, slice):
            start, stop, step = s.indices(size)
            out.append(len(range(start, stop, step)))
    return tuple(out)


@dataclass
class Source:
    kind: str
    files: list[Path]
    config: ModelConfig
    tensors: dict[str, SourceTensor]
    notes: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    _fingerprint: dict[str, Any] = field(default_factory=dict)
    _tokenizer: dict[str, bytes] = field(default_factory=dict)
    header_only: bool = False  # tensors carry no data: the source can be planned, not converted

    def tokenizer_files(self) -> dict[str, bytes]:
        return self._tokenizer

    def fingerprint(self) -> dict[str, Any]:
        return self._fingerprint
