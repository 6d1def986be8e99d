"""DeepSeek-R1 at its true size: `--plan` from header-only descriptions of all 61 layers, a GGUF and
DeepSeek's FP8 safetensors folder (each checked against a hand computation), and (slow tier) the
converter's memory and speed on the r1-slice.

Hand computation for `--target gpu --numa-nodes 2` of a Q4_K_M R1 (llama.cpp's current layout,
attn_k_b/attn_v_b), with the default GGUF CPU layout (ggml, lossless):
- GPU: every linear in Marlin int4 g128 (all R1 shapes have N % 64 == 0 and K % 128 == 0):
  0.5 byte per weight + one f16 scale per 128 weights = 33/64 byte per weight; norms, router and
  routing bias as f32.
- CPU: routed experts in their GGUF blocks (Q4_K: 144 bytes per 256 weights; ffn_down_exps Q6_K,
  210 per 256, in the layers llama.cpp's use_more_bits picks), cut in two equal halves of the
  2048-wide intermediate dimension; the token embedding (Q4_K) on node 0.

The same for DeepSeek's FP8 checkpoint (163 shards of headers: 91,991 tensors, 688,574,839,360
bytes as published), with the safetensors defaults (amx-int4, group 64):
- GPU: as above (kv_b_proj is one [32768, 512] matrix: as many weights as attn_k_b + attn_v_b).
- CPU: routed experts in amx_int4_v1 g64: per [N, K] matrix N*K/2 bytes of codes (1 KiB blocks of
  16 x 128) plus an f32 scale per 64 weights, 4*N*K/64 bytes (a multiple of 64: no padding); each
  node holds 1024 of the 2048 intermediate rows/columns. The token embedding (BF16) stays BF16 rows
  on node 0. Layer 61 (the multi-token-prediction module, 1564 tensors) is skipped.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from ktpack.convert.cli import main
from ktpack.convert.synth.r1 import R1, write_r1_description, write_r1_safetensors_description

H, LAYERS, DENSE, E, INTER, VOCAB = 7168, 61, 3, 256, 2048, 129280


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def hand_figures() -> dict[str, int]:
    attn = 1536 * H + 24576 * 1536 + 576 * H + 128 * 512 * 128 + 128 * 128 * 512 + H * 16384
    dense_mlp = 3 * 18432 * H
    shared = 3 * 2048 * H
    head = VOCAB * H
    marlin_weights = LAYERS * attn + DENSE * dense_mlp + (LAYERS - DENSE) * shared + head
    small = LAYERS * (H + 1536 + 512 + H) + (LAYERS - DENSE) * (E * H + E) + H
    gpu = marlin_weights * 33 // 64 + 4 * small
    node = 0
    # routed experts in ggml_lanes_v1: a 16-row lane block of Q4_K is 2368 bytes (148 a row per 256
    # values: the 12 packed scale bytes are stored as 16), of Q6_K 3360 (210, as in the GGUF)
    for i in range(DENSE, LAYERS):
        gate_up = 2 * E * INTER * H * 148 // 256
        down = E * H * INTER * (210 if use_more_bits(i, LAYERS) else 148) // 256
        node += (gate_up + down) // 2
    embd = VOCAB * H * 144 // 256
    return {"gpu": gpu, "node0": node + embd, "node1": node}


def hand_figures_fp8() -> dict[str, int]:
    attn = 1536 * H + 24576 * 1536 + 576 * H + 32768 * 512 + H * 16384
    marlin_weights = LAYERS * attn + DENSE * 3 * 18432 * H + (LAYERS - DENSE) * 3 * 2048 * H + VOCAB * H
    small = LAYERS * (H + 1536 + 512 + H) + (LAYERS - DENSE) * (E * H + E) + H
    gpu = marlin_weights * 33 // 64 + 4 * small
    half = INTER // 2
    matrix = half * H // 2 + 4 * half * H // 64  # [1024, 7168] gate/up and [7168, 1024] down alike
    node = (LAYERS - DENSE) * 3 * E * matrix
    embd = VOCAB * H * 2
    return {"gpu": gpu, "node0": node + embd, "node1": node}


def plan_totals(output: str) -> dict[str, int]:
    return {
        m.group(1): int(m.group(2).replace(",", "")) for m in re.finditer(r"^(gpu|node\d)\s+([\d,]+)\s", output, re.M)
    }


@pytest.fixture(scope="module")
def r1_desc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_r1_description(tmp_path_factory.mktemp("r1") / "r1-Q4_K_M.gguf")


@pytest.fixture(scope="module")
def r1_fp8_desc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_r1_safetensors_description(tmp_path_factory.mktemp("r1-fp8") / "DeepSeek-R1")


def test_full_r1_plan_matches_hand_computation(r1_desc):
    assert r1_desc.stat().st_size < 1 << 20  # a tensor table, no data
    r = CliRunner().invoke(main, [str(r1_desc), "--plan", "--target", "gpu", "--numa-nodes", "2", "--gpu-mem", "24"])
    assert r.exit_code == 0, r.output
    got = plan_totals(r.output)
    want = hand_figures()
    print(
        "\nfull R1 Q4_K_M, --target gpu --numa-nodes 2: "
        + ", ".join(f"{k} {v / 2**30:.3f} GiB" for k, v in got.items())
    )
    assert got == want
    assert want["gpu"] <= 24 * 2**30


def test_full_r1_fp8_plan_matches_hand_computation(r1_fp8_desc):
    shards = sorted(r1_fp8_desc.glob("*.safetensors"))
    assert len(shards) == 163 and shards[0].name == "model-00001-of-000163.safetensors"
    assert sum(p.stat().st_size for p in r1_fp8_desc.iterdir()) < 32 << 20  # headers, no data
    index = json.loads((r1_fp8_desc / "model.safetensors.index.json").read_text())
    # DeepSeek's published checkpoint: 91,991 tensors holding 688,574,839,360 bytes
    assert len(index["weight_map"]) == 91991 and index["metadata"]["total_size"] == 688_574_839_360
    # one scale per e4m3 Linear: 5 attention projections in layers 0..61 (61 = MTP), 3 dense MLP
    # projections in layers 0..2, 256 routed + 1 shared expert x 3 in layers 3..61; eh_proj is BF16
    n_scales = sum(1 for n in index["weight_map"] if n.endswith("_scale_inv"))
    assert n_scales == (LAYERS + 1) * 5 + DENSE * 3 + (LAYERS - DENSE + 1) * (E + 1) * 3
    args = [str(r1_fp8_desc), "--plan", "--target", "gpu", "--numa-nodes", "2", "--gpu-mem", "24"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    got = plan_totals(r.output)
    want = hand_figures_fp8()
    print(
        "\nfull R1 FP8 safetensors, --target gpu --numa-nodes 2: "
        + ", ".join(f"{k} {v / 2**30:.3f} GiB" for k, v in got.items())
    )
    assert got == want
    assert want["gpu"] == hand_figures()["gpu"]  # the GPU side does not depend on the source's format
    assert "model.layers.61.* (1564 tensors) skipped" in r.output
    assert re.search(r"^blk\.60\.ffn_down_exps\.weight\s+F8_E4M3\s+cpu\s+amx_int4_v1\s", r.output, re.M)
    assert re.search(r"^output\.weight\s+BF16\s+gpu\s+marlin_int4_v1\s", r.output, re.M)


def test_header_only_safetensors_is_refused_for_conversion(r1_fp8_desc, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, [str(r1_fp8_desc), "-o", str(out), "-q"])
    assert r.exit_code == 1
    assert r.output.strip() == (
        "kt-convert: error: model-00001-of-000163.safetensors: the file holds only a header (a tensor table "
        "without data): it can be planned (kt-convert --plan), not converted"
    )
    assert not out.exists() and not any(tmp_path.iterdir())


def test_header_only_is_refused_for_conversion(r1_desc, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, [str(r1_desc), "-o", str(out), "-q"])
    assert r.exit_code == 1
    assert r.output.strip() == (
        f"kt-convert: error: {r1_desc.name}: the file holds only a header (a tensor table without data): "
        f"it can be planned (kt-convert --plan), not converted"
    )
    assert not out.exists() and not any(tmp_path.iterdir())


def test_over_budget_plan_is_refused(r1_desc):
    r = CliRunner().invoke(main, [str(r1_desc), "--plan", "--target", "gpu", "--gpu-mem", "4"])
    assert r.exit_code == 2 and "--gpu-mem is 4 GiB" in r.output


# ------------------------------------------------------------------ slow: the r1-slice at scale


@pytest.mark.slow
def test_r1_slice_converter_memory_and_speed(tmp_path, tiny_dir):
    """Peak private memory (RssAnon) converting the r1-slice (1 dense + 1 MoE layer of R1's shapes;
    KTPACK_R1_EXPERTS routed experts, default 256: about 8 GB of Q4_K and 16 GB of FP8 on disk) is
    at most 1.5x the tiny model's and at most 1.5 GB; MB/s is printed."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
    from measure_convert import measure_once

    from ktpack.convert.synth.r1 import r1_slice_config, write_r1_slice_fp8, write_r1_slice_gguf
    from ktpack.convert.synth.st_writer import write_hf_sharded

    cfg = r1_slice_config(1, 1, experts=int(os.environ.get("KTPACK_R1_EXPERTS", "256")))
    assert cfg.hidden_size == R1.hidden_size
    tiny_fp8 = write_hf_sharded(tiny_dir / "hf", tmp_path / "tiny-fp8", "FP8")
    runs = {
        "tiny Q4_K": measure_once(tiny_dir / "tiny-Q4_K.gguf", []),
        "tiny FP8": measure_once(tiny_fp8, []),
    }
    gguf = write_r1_slice_gguf(tmp_path / "r1-slice-Q4_K.gguf", cfg)
    runs["r1-slice Q4_K"] = measure_once(gguf, [])
    gguf.unlink()
    fp8 = write_r1_slice_fp8(tmp_path / "r1-slice-fp8", cfg)
    runs["r1-slice FP8"] = measure_once(fp8, [])
    for k, r in runs.items():
        print(f"\n{k}: {r['source_bytes'] / 1e6:.0f} MB in {r['wall_s']:.1f} s = {r['mb_per_s']:.0f} MB/s, "
              f"peak RssAnon {r['peak_rss_anon_mb']:.0f} MB")  # fmt: skip
    for kind in ("Q4_K", "FP8"):
        peak = runs[f"r1-slice {kind}"]["peak_rss_anon_mb"]
        assert peak <= 1536 and peak <= 1.5 * runs[f"tiny {kind}"]["peak_rss_anon_mb"], (kind, peak)
