"""What a source reader gives the planner and writer: lazy tensors plus the model's metadata.

A reader (GGUF today, safetensors next) yields `SourceTensor`s whose bytes stay in the
memory-mapped source until asked for, one slice at a time, so conversion streams.
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
    _raw: np.ndarray  # uint8 view, shape (*shape[:-1], row_bytes), backed by the mmapped file

    @property
    def nbytes(self) -> int:
        return int(self._raw.size)

    def raw(self) -> np.ndarray:
        """Source bytes, uint8 (*shape[:-1], row_bytes); a view into the mapped file."""
        return self._raw

    def values(self, index: tuple[Any, ...] = ()) -> np.ndarray:
        """Float32 values of raw()[index] (index must keep whole rows)."""
        return ggml.dequantize(self._raw[index], self.dtype)


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

    def tokenizer_files(self) -> dict[str, bytes]:
        return self._tokenizer

    def fingerprint(self) -> dict[str, Any]:
        return self._fingerprint
