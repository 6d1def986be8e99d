"""The single table of layout ids, their parameters and the constants shared with native code.

Every packed tensor in a manifest names one of these ids. Ids carry their own version
(`_v1`): a change to a byte layout gets a new id, and an id that is dropped stays listed
in SPEC.md so its name is never handed out again.
"""

from __future__ import annotations

# Format of the packed folder (manifest.json). A reader refuses another major.
FORMAT_NAME = "ktpack"
FORMAT_MAJOR = 1
FORMAT_MINOR = 2  # 1.1: ggml_lanes_v1; 1.2: its Q5_0 / Q4_0 sources (as Q8_0 lane blocks)

# Alignment of every piece inside a CPU shard, and of shard headers: one page, so the
# runtime can mmap a shard and bind each piece to a NUMA node with page granularity.
SHARD_ALIGN = 4096
# Magic at the start of every CPU shard (its first page is a header; see SPEC.md).
SHARD_MAGIC = b"KTPKSHRD"

# Layout ids.
PLAIN = "plain_v1"  # row-major little-endian f32 / f16 / bf16
GGML_ROWS = "ggml_rows_v1"  # GGUF quant blocks kept bit-exact, ROWS rows interleaved block by block
GGML_LANES = "ggml_lanes_v1"  # Q4_K/Q6_K/Q8_0 blocks of 16 rows side by side, one row per SIMD lane (lossless)
AMX_BF16 = "amx_bf16_v1"  # 16 n x 32 k bf16 VNNI-2 tiles (1 KiB)
AMX_INT8 = "amx_int8_v1"  # 16 n x 64 k uint8 (q+128) VNNI-4 tiles (1 KiB), f32 scale per output row
AMX_INT4 = "amx_int4_v1"  # 16 n x 128 k uint4b8 blocks (1 KiB), f32 scale per (row, group)
MARLIN_INT4 = "marlin_int4_v1"  # Marlin int4 (uint4b8), group 128, fp16 scales (GPU)

ALL_LAYOUTS = (PLAIN, GGML_ROWS, GGML_LANES, AMX_BF16, AMX_INT8, AMX_INT4, MARLIN_INT4)

# Rows interleaved per group in the ggml family: one SIMD stream reads this many rows.
GGML_ROWS_PER_GROUP = 8
# Rows of a ggml_lanes_v1 lane block (one per 32-bit lane of a 512-bit register).
GGML_LANES_ROWS = 16

# AMX tile geometry (mirrored in kernels/include/layout_ids.h once native code lands).
TILE_N = 16  # output columns (rows of W) per tile
TILE_BYTES = 1024  # 16 rows x 64 bytes
AMX_K_PER_TILE = {AMX_BF16: 32, AMX_INT8: 64, AMX_INT4: 128}
AMX_N_BLOCK = 4  # n-tiles a micro-kernel accumulates at once; the N-block is the thread/NUMA unit

MARLIN_GROUP = 128

# The --cpu-layout names users type, and the layout id each selects. `ggml` keeps the GGUF's weights
# exactly: Q4_K/Q6_K/Q8_0 in ggml_lanes_v1 and BF16 in amx_bf16_v1 (exact for bf16 values) where the
# shape allows it (faster), ggml_rows_v1 elsewhere; `ggml-rows` keeps every tensor in ggml_rows_v1.
CPU_LAYOUT_CHOICES = {
    "ggml": GGML_ROWS,
    "ggml-rows": GGML_ROWS,
    "amx-int4": AMX_INT4,
    "amx-int8": AMX_INT8,
    "amx-bf16": AMX_BF16,
}
