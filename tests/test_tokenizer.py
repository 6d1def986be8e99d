"""A tokenizer rebuilt from GGUF metadata matches the checkpoint's own tokenizer.json."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import jinja2
import pytest
from tokenizers import Tokenizer

from ktpack.convert.tokenizer import (
    build_tokenizer,
    deepseek_v3_pre_tokenizer,
    tokenizer_from_gguf_fields,
)

TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and trailing   ",
    "tabs\tand\ttabs\t\tdouble",
    "line one\nline two\n\n\nline five\r\nwindows",
    "def f(x, y=None):\n    return x ** 2 + y  # comment\n",
    'int main() { printf("%d\\n", 42); return 0; }',
    "x = [1, 2, 3]; y = {'a': 1.5e-3}",
    "1234567890 12 123 1234 3.14159 -42 1,000,000",
    "2024-01-31T12:34:56Z",
    "你好，世界！这是一个测试。",
    "日本語のテキスト、ひらがなとカタカナ。",
    "混合 mixed 文本 text 123 和 456",
    "Emoji: 😀😂👍🔥 🚀✨ ❤️",
    "Ünïcödé café naïve Zürich señor",
    "привет мир, как дела?",
    "<｜User｜>Hi there<｜Assistant｜>Hello!<｜end▁of▁sentence｜>",
    "<｜begin▁of▁sentence｜>text<｜▁pad▁｜>",
    "<think>\nreasoning...\n</think>\n\nanswer",
    "!!!???...,,,;;;::: ((()))[[[]]]{{{}}}",
    "    \n    \n",
    "a",
    "",
    "'s 're 've don't I'll",
    "https://example.com/path?q=1&r=two#frag",
    "\u00a0non-breaking\u2009thin\u3000ideographic space",
]


@pytest.fixture(scope="module")
def gguf_fields(tiny_models: dict[str, Path]) -> dict[str, object]:
    r = gguf.GGUFReader(tiny_models["Q8_0"])
    return {k: f.contents() for k, f in r.fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def hf_tok(tiny_models: dict[str, Path]) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_models["hf"] / "tokenizer.json"))


@pytest.fixture(scope="module")
def rebuilt(gguf_fields: dict[str, object]) -> tuple[Tokenizer, dict]:
    return tokenizer_from_gguf_fields(gguf_fields)


@pytest.mark.parametrize("add_special", [True, False])
def test_same_ids_as_hf(hf_tok: Tokenizer, rebuilt: tuple[Tokenizer, dict], add_special: bool) -> None:
    tok, _ = rebuilt
    assert len(TEXTS) >= 20
    for text in TEXTS:
        want = hf_tok.encode(text, add_special_tokens=add_special).ids
        got = tok.encode(text, add_special_tokens=add_special).ids
        assert got == want, text
        assert tok.decode(got, skip_special_tokens=False) == hf_tok.decode(want, skip_special_tokens=False)


def test_vocab_and_specials(hf_tok: Tokenizer, rebuilt: tuple[Tokenizer, dict]) -> None:
    tok, _ = rebuilt
    assert tok.get_vocab(with_added_tokens=True) == hf_tok.get_vocab(with_added_tokens=True)
    for s in ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "<｜end▁of▁sentence｜>"]:
        assert tok.encode(s, add_special_tokens=False).ids == [hf_tok.token_to_id(s)]
    assert tok.encode("abc").ids[0] == 0  # BOS from add_bos_token


def test_config_dict(rebuilt: tuple[Tokenizer, dict], tiny_models: dict[str, Path]) -> None:
    _, cfg = rebuilt
    ref = json.loads((tiny_models["hf"] / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == ref["bos_token"] == "<｜begin▁of▁sentence｜>"
    assert cfg["eos_token"] == ref["eos_token"] == "<｜end▁of▁sentence｜>"
    assert cfg["pad_token"] == ref["pad_token"] == "<｜▁pad▁｜>"
    assert cfg["add_bos_token"] is True and cfg["add_eos_token"] is False
    assert cfg["chat_template"] == ref["chat_template"]


def test_chat_template_renders_to_special_ids(rebuilt: tuple[Tokenizer, dict], hf_tok: Tokenizer) -> None:
    tok, cfg = rebuilt
    env = jinja2.Environment()
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>add</think>4"},
        {"role": "user", "content": "Thanks"},
    ]
    text = env.from_string(cfg["chat_template"]).render(
        messages=msgs, bos_token=cfg["bos_token"], add_generation_prompt=True
    )
    assert text == (
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>What is 2+2?<｜Assistant｜>4<｜end▁of▁sentence｜>"
        "<｜User｜>Thanks<｜Assistant｜>"
    )
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids == hf_tok.encode(text, add_special_tokens=False).ids
    assert ids[0] == 0 and ids[-1] == hf_tok.token_to_id("<｜Assistant｜>")
    assert ids.count(hf_tok.token_to_id("<｜User｜>")) == 2


def test_pre_tokenizer_splits() -> None:
    pre = deepseek_v3_pre_tokenizer()
    pieces = [p for p, _ in pre.pre_tokenize_str("abc 12345 你好 x")]
    # digits in groups of <= 3, CJK run isolated, byte-level mapping of the space
    assert pieces == ["abc", "Ġ", "123", "45", "Ġ", "ä½łå¥½", "Ġx"]


def test_unknown_pre_rejected() -> None:
    with pytest.raises(ValueError, match="llama-bpe"):
        build_tokenizer(["a", "b", "ab"], ["a b"], [1, 1, 1], "llama-bpe")


def test_unknown_model_rejected() -> None:
    with pytest.raises(ValueError, match="llama"):
        tokenizer_from_gguf_fields({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]})
