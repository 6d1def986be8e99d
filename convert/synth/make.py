"""Write the whole family of synthetic test models (HF checkpoint + GGUF variants)."""

from __future__ import annotations

from pathlib import Path

from .hf import make_hf_checkpoint
from .writer import write_gguf

GGUF_QTYPES = ("F32", "BF16", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q4_K_M")
LEGACY_QTYPES = ("F32", "Q8_0", "Q4_K")
SPLIT_QTYPE = "Q8_0"
SPLIT_PARTS = 3


def make_all(out_dir: str | Path, preset: str = "tiny", seed: int = 0) -> dict[str, Path]:
    """Write ``out_dir/hf/``, ``{preset}-{Q}.gguf``, ``{preset}-legacy-{Q}.gguf`` and a 3-part split.

    Keys of the returned dict: ``"hf"``, each qtype (``"Q4_K_M"``), ``"legacy-F32"``..., and
    ``"split-1"``, ``"split-2"``, ``"split-3"`` (the split parts, in order).
    """
    out = Path(out_dir)
    paths: dict[str, Path] = {"hf": make_hf_checkpoint(preset, out / "hf", seed=seed)}
    for q in GGUF_QTYPES:
        (paths[q],) = write_gguf(paths["hf"], out / f"{preset}-{q}.gguf", q)
    for q in LEGACY_QTYPES:
        (paths[f"legacy-{q}"],) = write_gguf(paths["hf"], out / f"{preset}-legacy-{q}.gguf", q, legacy=True)
    parts = write_gguf(paths["hf"], out / "split" / f"{preset}-{SPLIT_QTYPE}.gguf", SPLIT_QTYPE, split=SPLIT_PARTS)
    for i, p in enumerate(parts, 1):
        paths[f"split-{i}"] = p
    return paths
