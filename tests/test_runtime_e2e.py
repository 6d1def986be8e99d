"""kt-run's engine end to end against transformers, on every tiny GGUF variant.

What can go wrong: a variant whose packed layout the runtime reads wrongly (a quant type, the
legacy kv_b, a split source, Marlin on the GPU side); bf16 rounding beyond what bf16 weights
explain; a decode loop that drifts from transformers' greedy `generate` (KV cache, positions,
sampling); a packed tokenizer or chat template that gives other ids than transformers' tokenizer.
Oracles: transformers' `DeepseekV3ForCausalLM` (float32, eager) on the original hf/ weights or on
exactly the weights a pack represents (tests/oracle.py), and `AutoTokenizer` on hf/.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from oracle import TOL, Packs, compare, hf_logits, kt_run_cmd, oracle_for, session_packs

from ktpack.layouts import manifest as mf
from ktpack.runtime.chat import ChatTokenizer
from ktpack.runtime.engine import Engine
from ktpack.runtime.model import DeepseekV3Model, KVCache
from ktpack.runtime.sampling import SamplingParams
from ktpack.runtime.weights import load_pack

N_TOKENS = 72  # positions compared (64+)
CTX = 160
BF16_TOL = 2e-2
GEN_PROMPT = "Write a short poem about the sea, please."
N_NEW = 64

VARIANTS = [
    "tiny-F32.gguf", "tiny-BF16.gguf", "tiny-Q8_0.gguf", "tiny-Q4_K.gguf", "tiny-Q5_K.gguf",
    "tiny-Q6_K.gguf", "tiny-Q4_K_M.gguf", "tiny-legacy-F32.gguf", "tiny-legacy-Q8_0.gguf",
    "tiny-legacy-Q4_K.gguf", "split/tiny-Q8_0-00001-of-00003.gguf",
]  # fmt: skip
CASES = [(v, "cpu") for v in VARIANTS] + [("tiny-Q4_K_M.gguf", "gpu")]


@pytest.fixture(scope="module")
def packs(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Packs:
    return session_packs(tmp_path_factory, tiny_dir)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 4096, (N_TOKENS,), generator=torch.Generator().manual_seed(4321))


def engine_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(Engine(folder, ctx_size=CTX).score(ids.tolist()))


# ------------------------------------------------------------------------------ logits


@pytest.fixture(scope="module")
def bf16_case(tiny_dir, packs, ids) -> dict[str, float]:
    """Max |diff| of the bf16 pack (ours), transformers on the original f32 weights (f32) and
    transformers on the pack's bf16 weights (bf16)."""
    folder = packs("tiny-BF16.gguf", target="cpu")
    ours = engine_logits(folder, ids)
    f32 = hf_logits(oracle_for(tiny_dir), ids)
    bf16 = hf_logits(oracle_for(tiny_dir, folder), ids)
    d = {
        "ours_vs_f32": (ours - f32).abs().max().item(),
        "ours_vs_bf16": (ours - bf16).abs().max().item(),
        "bf16_vs_f32": (bf16 - f32).abs().max().item(),
        "top1_ours_vs_f32": (ours.argmax(-1) == f32.argmax(-1)).float().mean().item(),
    }
    print(
        f"\nBF16 --target cpu, {N_TOKENS} positions: max |diff| vs transformers on the original f32 weights "
        f"{d['ours_vs_f32']:.3g} (top-1 equal at {d['top1_ours_vs_f32']:.0%}); vs transformers on the "
        f"pack's bf16 weights {d['ours_vs_bf16']:.3g}; transformers bf16 weights vs f32 weights {d['bf16_vs_f32']:.3g}"
    )
    return d


def test_bf16_pack_vs_transformers_on_original_weights(bf16_case, record_property):
    """The runtime adds nothing to what bf16 weights cost: exact on the pack's own weights, and
    against the original f32 weights no further than transformers itself is on bf16 weights."""
    for k, v in bf16_case.items():
        record_property(k, v)
    assert bf16_case["ours_vs_bf16"] <= TOL
    assert bf16_case["ours_vs_f32"] <= bf16_case["bf16_vs_f32"] + TOL


@pytest.mark.xfail(
    strict=True,
    reason="the issue's 2e-2 bound is below what bf16 rounding of the tiny model's weights costs "
    "transformers itself (~2.5e-2 here; > 1 where the rounding flips an expert choice)",
)
def test_bf16_pack_within_issue_bound(bf16_case):
    assert bf16_case["ours_vs_f32"] <= BF16_TOL


@pytest.mark.parametrize("src,target", CASES, ids=[f"{s.split('/')[-1][5:-5]}-{t}" for s, t in CASES])
def test_every_variant_matches_transformers_on_its_weights(tiny_dir, packs, ids, src, target, record_property):
    folder = packs(src, target=target)
    want = hf_logits(oracle_for(tiny_dir, folder), ids)
    diff = compare(engine_logits(folder, ids), want)
    record_property("max_abs_diff", diff)
    print(f"\n{src} --target {target} vs transformers on the pack's weights: max |diff| = {diff:.3g}")


# ------------------------------------------------------------------------------ greedy generation


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy `generate`, forced to run `n` steps (EOS is not a stop)."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(
        do_sample=False, max_new_tokens=n, min_new_tokens=0, eos_token_id=None, pad_token_id=0, use_cache=True
    )
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), generation_config=cfg, attention_mask=torch.ones(1, len(prompt)))
    new = out[0, len(prompt) :].tolist()
    assert len(new) == n, f"transformers stopped after {len(new)} tokens"
    return new


@pytest.fixture(scope="module")
def greedy_case(tiny_dir, packs) -> tuple[Path, list[int], list[int]]:
    """(f32 pack, chat prompt ids, transformers' 64 greedy ids)."""
    folder = packs("tiny-F32.gguf", target="cpu")
    prompt = ChatTokenizer.from_folder(folder).encode_chat([{"role": "user", "content": GEN_PROMPT}])
    return folder, prompt, hf_greedy(oracle_for(tiny_dir), prompt, N_NEW)


def test_greedy_generate_equals_transformers(greedy_case):
    folder, prompt, want = greedy_case
    eng = Engine(folder, ctx_size=CTX)
    pieces: list[str] = []
    gen = eng.generate(
        prompt, SamplingParams(temperature=0), max_new_tokens=N_NEW, ignore_eos=True, on_text=pieces.append
    )
    first_diff = next((i for i, (a, b) in enumerate(zip(gen.output_ids, want, strict=True)) if a != b), None)
    assert gen.output_ids == want, f"first difference at step {first_diff}"
    assert gen.finish_reason == "length" and gen.stats.generated_tokens == N_NEW
    # the text is streamed in pieces as tokens come, and the pieces make the whole text
    assert len(pieces) > 1 and "".join(pieces) == gen.text == eng.tokenizer.decode(gen.output_ids)
    print(f"\nEngine.generate greedy: {N_NEW} ids equal to transformers' generate; {gen.stats.line()}")


def test_greedy_cli_equals_transformers(greedy_case, tmp_path):
    folder, prompt, want = greedy_case
    np.save(tmp_path / "ids.npy", np.array(prompt, np.int64))
    stats = tmp_path / "s.json"
    args = ["--prompt-ids", "ids.npy", "--temperature", "0", "--max-new-tokens", str(N_NEW), "--ignore-eos"]
    r = subprocess.run(
        [*kt_run_cmd(), str(folder), *args, "--stats-json", str(stats)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    s = json.loads(stats.read_text())
    assert s["prompt_ids"] == prompt
    assert s["output_ids"] == want
    print(f"\nkt-run --temperature 0 --ignore-eos: {N_NEW} ids equal to transformers' generate")
    print(f"kt-run on the tiny f32 pack: {r.stderr.strip()}")
    print(f"kt-run decode {s['decode_tok_s']:.1f} tok/s, prefill {s['prefill_tok_s']:.1f} tok/s")


# ------------------------------------------------------------------------------ tokenizer

TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "def f(x, y=None):\n    return x ** 2 + y  # comment\n",
    'int main() { printf("%d\\n", 42); return 0; }',
    "for (let i = 0; i < n; i++) {\n\tsum += a[i];\n}",
    "1234567890 12 123 1234 3.14159 -42 1,000,000 0x1F",
    "你好，世界！这是一个测试。",
    "日本語のテキスト、ひらがなとカタカナ。한국어 텍스트",
    "混合 mixed 文本 text 123 和 456",
    "Emoji: 😀😂👍🔥 🚀✨ ❤️ 👨‍👩‍👧‍👦 🇫🇷",
    "Ünïcödé café naïve Zürich señor привет мир",
    "   leading spaces, trailing spaces   ",
    "runs:  two   three    four\t\ttabs\n\n\nnewlines\r\n",
    "    \n    \n",
    "<｜User｜>Hi there<｜Assistant｜>Hello!<｜end▁of▁sentence｜>",
    "<｜begin▁of▁sentence｜>text<｜▁pad▁｜>",
    "<think>\nreasoning...\n</think>\n\nanswer",
    "<｜User｜><｜Assistant｜><think></think>",
    "!!!???...,,,;;;::: ((()))[[[]]]{{{}}}",
    "'s 're 've don't I'll WE'LL",
    "https://example.com/path?q=1&r=two#frag",
    "\u00a0non-breaking\u2009thin\u3000ideographic space",
    "a",
    "",
]


def _ids(x) -> list[int]:
    return list(x["input_ids"] if hasattr(x, "keys") else x)


def test_packed_tokenizer_matches_transformers(tiny_dir, packs):
    from transformers import AutoTokenizer

    ours = ChatTokenizer.from_folder(packs("tiny-Q8_0.gguf", target="cpu"))  # files written by kt-convert
    hf = AutoTokenizer.from_pretrained(tiny_dir / "hf")
    assert len(TEXTS) >= 20
    for text in TEXTS:
        want = _ids(hf(text))  # with its special tokens (BOS)
        assert ours.encode_raw(text) == want, text
        assert ours.decode(want) == hf.decode(want, skip_special_tokens=False), text
    convs = [[{"role": "user", "content": t}] for t in TEXTS if t] + [
        [
            {"role": "system", "content": "Be brief. 简洁。"},
            {"role": "user", "content": "2+2? 🙂"},
            {"role": "assistant", "content": "<think>add them</think>4"},
            {"role": "user", "content": "def f(x):\n    return x"},
        ],
        [{"role": "system", "content": "A"}, {"role": "system", "content": "B"}, {"role": "user", "content": "C"}],
    ]
    for msgs in convs:
        assert ours.render(msgs) == hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        want = _ids(hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))
        assert ours.encode_chat(msgs) == want, msgs
    print(f"\npacked tokenizer: {len(TEXTS)} texts raw and {len(convs)} conversations equal to AutoTokenizer")


# ------------------------------------------------------------------------------ memory (reported)


def _status_kb() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0])
    return out


def test_report_rss_after_load(packs):
    """Reported, not asserted beyond the mapping bound (tests/test_runtime_forward.py asserts it)."""
    if not Path("/proc/self/status").exists():
        pytest.skip("no /proc/self/status")
    for src in ("tiny-F32.gguf", "tiny-Q4_K_M.gguf"):
        folder = packs(src, target="cpu")
        m = mf.load(folder)
        shard = sum(f.size for f in m.files if f.kind == "cpu_shard")
        gpu_side = sum(f.size for f in m.files if f.kind == "safetensors")
        before = _status_kb()
        pack = load_pack(folder)
        loaded = _status_kb()
        model = DeepseekV3Model(pack)
        model.forward(torch.arange(32), 0, KVCache(model.config, 64))
        ran = _status_kb()
        d_load = {k: (loaded[k] - before[k]) / 1024 for k in before}
        d_run = {k: (ran[k] - before[k]) / 1024 for k in before}
        print(
            f"\n{src} --target cpu: CPU shards {shard / 2**20:.1f} MiB, GPU-side files {gpu_side / 2**10:.0f} KiB; "
            f"after load_pack: " + ", ".join(f"{k} +{v:.1f} MiB" for k, v in d_load.items()) + "; "
            "after a 32-token forward: " + ", ".join(f"{k} +{v:.1f} MiB" for k, v in d_run.items())
        )
        assert d_load["RssAnon"] * 2**20 < shard / 4
