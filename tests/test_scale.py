"""Slow tier: the converter streams, so its private memory does not grow with model size.

What can go wrong: a reader or packer that materialises a whole tensor (or model) in anonymous
memory. Mapped source pages and the page cache of written files are file-backed and reclaimable,
so the measure is the peak of RssAnon, sampled from /proc while the converter runs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ktpack.convert import produce

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _measure():
    spec = importlib.util.spec_from_file_location("measure_convert", ROOT / "scripts" / "measure_convert.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.measure_once


# Growth allowed between a 12 MB and a 1.3 GB source. What scales with a chunk, never with the model:
# the dequantized f32 chunk, the quantizer's temporaries (about 8 chunk-sized arrays for amx-int4 or
# Marlin), the packed copy and up to 4 chunks queued for the writer thread: 16 chunks of
# CHUNK_VALUES * 4 bytes. The bench vocabulary (32000 tokens, 8x tiny's: token and merge strings, the
# tokenizer.json text and its parse) adds up to 40 MB; it grows with the vocabulary, not the weights.
MAX_GROWTH_MB = 16 * produce.CHUNK_VALUES * 4 / 2**20 + 40


@pytest.mark.parametrize("args", [["--target", "cpu"], ["--target", "gpu", "--cpu-layout", "amx-int4"]])
def test_peak_private_memory_does_not_grow(tiny_dir, tmp_path_factory, args):
    from ktpack.convert.synth import write_random_gguf

    big_dir = tmp_path_factory.mktemp("bench")
    (big,) = write_random_gguf("bench", big_dir / "bench-Q8_0.gguf", "Q8_0")
    measure = _measure()
    small = measure(tiny_dir / "tiny-Q8_0.gguf", args)
    large = measure(big, args)
    assert large["source_bytes"] >= 20 * small["source_bytes"]
    growth = large["peak_rss_anon_mb"] - small["peak_rss_anon_mb"]
    print(f"\npeak RssAnon {small['peak_rss_anon_mb']:.0f} MB -> {large['peak_rss_anon_mb']:.0f} MB, "
          f"{large['mb_per_s']:.0f} MB/s on {large['source_bytes'] / 1e6:.0f} MB")  # fmt: skip
    assert growth <= MAX_GROWTH_MB, f"peak RssAnon grew by {growth:.0f} MB (allowed {MAX_GROWTH_MB:.0f} MB)"
