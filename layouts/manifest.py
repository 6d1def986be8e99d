"""The manifest: what every byte of a packed folder is. Read, validate, write.

`manifest.json` is the single source of truth of a packed folder (SPEC.md, "Manifest"). The
schema is versioned `MAJOR.MINOR`; a reader refuses a manifest of another major and says which
major it found and which it reads. `manifest.schema.json` is the machine-readable schema.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import ModelConfig
from .errors import ManifestError
from .ids import ALL_LAYOUTS, FORMAT_MAJOR, FORMAT_MINOR, FORMAT_NAME

MANIFEST_NAME = "manifest.json"


@dataclass
class Piece:
    """A contiguous byte range of one file holding (part of) a tensor.

    A tensor has one piece per NUMA slice and per part (`part` is "data" for single-part
    layouts; Marlin has "qweight" and "scales"). `shape` is the logical shape of the slice.
    """

    file: str
    offset: int
    nbytes: int
    shape: list[int]
    part: str = "data"
    node: int | None = None  # NUMA node of a CPU piece; None for GPU-side (safetensors) pieces
    key: str | None = None  # the tensor name inside a safetensors file
    dtype: str | None = None  # the stored element type of a safetensors piece (U8, I32, F16, ...)
    sha256: str | None = None


@dataclass
class TensorEntry:
    name: str  # the source's tensor name (the GGUF name for a GGUF source)
    shape: list[int]  # logical shape, numpy order (source order)
    source_dtype: str  # GGML type name, or a safetensors dtype
    placement: str  # "gpu" (safetensors, GPU when there is one) or "cpu" (mmapped shards)
    role: str  # routed_expert | linear | embedding | small
    layout: str  # a layout id from ids.py
    params: dict[str, Any] = field(default_factory=dict)
    split_axis: int | None = None  # axis cut across NUMA nodes (None: not split)
    split_bounds: list[list[int]] | None = None  # [lo, hi) per node along split_axis
    pieces: list[Piece] = field(default_factory=list)

    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)


@dataclass
class FileEntry:
    path: str
    size: int
    kind: str  # "cpu_shard" | "safetensors" | "tokenizer" | "json"
    node: int | None = None
    sha256: str | None = None  # for small auxiliary files (tokenizer); tensors carry their own


@dataclass
class Manifest:
    config: ModelConfig
    source: dict[str, Any]
    options: dict[str, Any]
    files: list[FileEntry]
    tensors: list[TensorEntry]
    notes: list[str] = field(default_factory=list)
    created_by: str = ""
    format: str = FORMAT_NAME
    format_version: str = f"{FORMAT_MAJOR}.{FORMAT_MINOR}"

    def tensor(self, name: str) -> TensorEntry:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_json(self) -> str:
        d = {
            "format": self.format,
            "format_version": self.format_version,
            "created_by": self.created_by,
            "source": self.source,
            "options": self.options,
            "config": self.config.to_dict(),
            "notes": self.notes,
            "files": [_strip(asdict(f)) for f in self.files],
            "tensors": [_tensor_dict(t) for t in self.tensors],
        }
        return json.dumps(d, indent=1, sort_keys=False) + "\n"

    def save(self, folder: Path) -> None:
        (Path(folder) / MANIFEST_NAME).write_text(self.to_json())


def _strip(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _tensor_dict(t: TensorEntry) -> dict[str, Any]:
    d = asdict(t)
    d["pieces"] = [_strip(p) for p in d["pieces"]]
    return _strip(d)


def parse_version(v: Any, where: str) -> tuple[int, int]:
    try:
        major, minor = (int(x) for x in str(v).split("."))
    except ValueError:
        raise ManifestError(f"{where}: format_version {v!r} is not MAJOR.MINOR") from None
    return major, minor


def load(folder: Path | str) -> Manifest:
    """Read and validate `folder/manifest.json`. Raises ManifestError with a one-line reason."""
    path = Path(folder) / MANIFEST_NAME
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: no manifest (not a ktpack folder, or an unfinished conversion)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    return from_dict(d, str(path))


def from_dict(d: dict[str, Any], where: str = MANIFEST_NAME) -> Manifest:
    if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
        raise ManifestError(f"{where}: not a {FORMAT_NAME} manifest (format = {d.get('format')!r})")
    major, _ = parse_version(d.get("format_version"), where)
    if major != FORMAT_MAJOR:
        raise ManifestError(
            f"{where}: format version {d.get('format_version')} (major {major}); this ktpack reads major "
            f"{FORMAT_MAJOR}: re-run kt-convert with this version, or use a ktpack that reads major {major}"
        )
    try:
        cfg = ModelConfig.from_dict(d["config"])
        files = [FileEntry(**f) for f in d["files"]]
        tensors = []
        for t in d["tensors"]:
            t = dict(t)
            t["pieces"] = [Piece(**p) for p in t["pieces"]]
            tensors.append(TensorEntry(**t))
        m = Manifest(
            config=cfg,
            source=d["source"],
            options=d["options"],
            files=files,
            tensors=tensors,
            notes=list(d.get("notes", [])),
            created_by=d.get("created_by", ""),
            format_version=d["format_version"],
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ManifestError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None
    _validate(m, where)
    return m


def _validate(m: Manifest, where: str) -> None:
    sizes = {f.path: f.size for f in m.files}
    names = set()
    for t in m.tensors:
        if t.name in names:
            raise ManifestError(f"{where}: tensor {t.name} is listed twice")
        names.add(t.name)
        if t.layout not in ALL_LAYOUTS:
            raise ManifestError(f"{where}: tensor {t.name} has unknown layout {t.layout!r}")
        for p in t.pieces:
            if p.file not in sizes:
                raise ManifestError(f"{where}: tensor {t.name} names file {p.file} that the manifest does not list")
            if p.offset < 0 or p.nbytes < 0 or p.offset + p.nbytes > sizes[p.file]:
                raise ManifestError(
                    f"{where}: tensor {t.name} piece [{p.offset}, {p.offset + p.nbytes}) lies outside "
                    f"{p.file} ({sizes[p.file]} bytes)"
                )
