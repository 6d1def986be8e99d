"""Deterministic training corpus and byte-level BPE tokenizer for the synthetic models."""

from __future__ import annotations

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ..tokenizer import deepseek_v3_pre_tokenizer

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
THINK_END = "</think>"
# (content, special): the special ones look like DeepSeek's <｜...｜> control tokens
CHAT_TOKENS: tuple[tuple[str, bool], ...] = (
    (USER, True),
    (ASSISTANT, True),
    (THINK, False),
    (THINK_END, False),
)

# Our own jinja equivalent of DeepSeek-V3/R1's chat template: bos, concatenated system prompts,
# <｜User｜>content, <｜Assistant｜>content<｜end▁of▁sentence｜> (reasoning before </think> dropped from
# history), and <｜Assistant｜> as the generation prompt.
CHAT_TEMPLATE = (
    "{%- if add_generation_prompt is not defined -%}{%- set add_generation_prompt = false -%}{%- endif -%}"
    "{%- set ns = namespace(system='', first=true) -%}"
    "{%- for m in messages if m['role'] == 'system' -%}"
    "{%- if ns.first -%}{%- set ns.system = m['content'] -%}{%- set ns.first = false -%}"
    "{%- else -%}{%- set ns.system = ns.system + '\\n\\n' + m['content'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- bos_token -}}{{- ns.system -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{- '" + USER + "' + m['content'] -}}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{%- set content = m['content'] -%}"
    "{%- if '" + THINK_END + "' in content -%}{%- set content = content.split('" + THINK_END + "')[-1] -%}"
    "{%- endif -%}"
    "{{- '" + ASSISTANT + "' + content + '" + EOS + "' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '" + ASSISTANT + "' -}}{%- endif -%}"
)

_CONSONANTS = list("bcdfghjklmnprstvwz") + ["th", "sh", "ch", "st", "tr", "pl", "gr", "qu"]
_VOWELS = list("aeiou") + ["ea", "ou", "io", "ai"]
_CODAS = ["", "", "", "n", "s", "t", "r", "l", "ng", "ck", "nd", "st"]
_EMOJI = "😀😂🙂😉😍🤔🙈👍👋🔥✨🚀🎉💡📦🐍🦀🌍🍕☕❤️✅❌⭐🌸🐱"
_KANA = [chr(c) for c in range(0x3041, 0x3097)] + [chr(c) for c in range(0x30A1, 0x30FB)]
_ACCENTED = ["café", "naïve", "über", "señor", "façade", "Ångström", "déjà", "crème", "Zürich", "São"]
_CYRILLIC = ["привет", "мир", "данные", "модель", "слово", "время"]
_CODE_TEMPLATES = [
    "def {a}_{b}({c}, {d}=None):\n    if {c} is None:\n        return {n}\n    return {c} + {n}\n",
    "for {a} in range({n}):\n\t{b}[{a}] = {c}({a}) * {m}\n",
    "int {a}_{b}(int {c}) {{\n    return {c} * {n} + {m};\n}}\n",
    "const {a} = ({b}) => {{ return {b}.{c}({n}); }};\n",
    "class {A}{B}:\n    def __init__(self):\n        self.{c} = [{n}, {m}]\n",
    "if ({a} != {n} && {b} <= {m}) {{ {c}++; }}\n",
    "# {A} {b} {c}\n{a} = {{'{b}': {n}, '{c}': {m}.{n}}}\n",
    "    {a}.{b}({c}=True)  # TODO: {d}\n",
]


class _Words:
    def __init__(self, rng: np.random.Generator, n: int = 2500) -> None:
        words: list[str] = []
        seen: set[str] = set()
        while len(words) < n:
            k = int(rng.integers(1, 4))
            w = "".join(str(rng.choice(_CONSONANTS)) + str(rng.choice(_VOWELS)) for _ in range(k)) + str(
                rng.choice(_CODAS)
            )
            if w not in seen:
                seen.add(w)
                words.append(w)
        self.words = words
        p = 1.0 / np.arange(1, n + 1) ** 1.05  # Zipf-ish
        self.p = p / p.sum()
        self.rng = rng

    def pick(self, k: int = 1) -> list[str]:
        idx = self.rng.choice(len(self.words), size=k, p=self.p)
        return [self.words[i] for i in idx]


def _sentence(rng: np.random.Generator, w: _Words) -> str:
    ws = w.pick(int(rng.integers(4, 16)))
    ws[0] = ws[0].capitalize()
    for i in range(1, len(ws)):
        r = rng.random()
        if r < 0.06:
            ws[i] = ws[i] + ","
        elif r < 0.08:
            ws[i] = ws[i].upper()
        elif r < 0.1:
            ws[i] = str(rng.choice(_ACCENTED))
        elif r < 0.11:
            ws[i] = str(rng.choice(_CYRILLIC))
        elif r < 0.16:
            ws[i] = str(int(rng.integers(0, 100000)))
    end = str(rng.choice([".", ".", ".", "!", "?", "...", ":"]))
    return " ".join(ws) + end


def _code(rng: np.random.Generator, w: _Words) -> str:
    a, b, c, d = w.pick(4)
    tmpl = str(rng.choice(_CODE_TEMPLATES))
    return tmpl.format(
        a=a,
        b=b,
        c=c,
        d=d,
        A=a.capitalize(),
        B=b.capitalize(),
        n=int(rng.integers(0, 1000)),
        m=f"{rng.random() * 100:.3f}",
    )


def _cjk(rng: np.random.Generator, han: list[str]) -> str:
    parts = []
    for _ in range(int(rng.integers(1, 4))):
        if rng.random() < 0.7:
            s = "".join(rng.choice(han, size=int(rng.integers(2, 12))))
        else:
            s = "".join(rng.choice(_KANA, size=int(rng.integers(2, 8))))
        parts.append(s + str(rng.choice(["。", "，", "、", "！", "", " "])))
    return "".join(parts)


def corpus_lines(seed: int = 0, n_lines: int = 12000) -> list[str]:
    """A seeded mixture of English-like prose, code, numbers, CJK and emoji (one str per line/doc)."""
    rng = np.random.default_rng([seed, 0xC0FFEE])
    words = _Words(rng)
    han_idx = rng.choice(0x9FA5 - 0x4E00, size=600, replace=False) + 0x4E00
    han = [chr(int(c)) for c in han_idx]
    out = []
    for _ in range(n_lines):
        r = rng.random()
        if r < 0.5:
            s = " ".join(_sentence(rng, words) for _ in range(int(rng.integers(1, 4))))
        elif r < 0.72:
            s = _code(rng, words)
        elif r < 0.85:
            s = _cjk(rng, han)
        elif r < 0.92:
            y, mo, d = int(rng.integers(1900, 2100)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
            s = f"{y}-{mo:02d}-{d:02d} "
            s += f"{rng.random() * 1e4:.2f} {int(rng.integers(0, 10**9))} {words.pick()[0]}"
        else:
            k = int(rng.integers(1, 4))
            s = " ".join(words.pick(3)) + " " + "".join(rng.choice(list(_EMOJI), size=k))
        if rng.random() < 0.1:
            s = s + "\n\n" + " " * int(rng.integers(1, 9))
        out.append(s)
    return out


def train_tokenizer(vocab_size: int, seed: int = 0) -> Tokenizer:
    """Byte-level BPE with DeepSeek-V3's pre-tokenizer; BOS/EOS/PAD get ids 0/1/2 and the chat
    tokens are appended after the trained vocabulary (total = ``vocab_size`` if the corpus allows)."""
    tok = Tokenizer(models.BPE(fuse_unk=False, byte_fallback=False, ignore_merges=False))
    tok.pre_tokenizer = deepseek_v3_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(CHAT_TOKENS),
        min_frequency=2,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in (BOS, EOS, PAD)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    lines = corpus_lines(seed)
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    for content, special in CHAT_TOKENS:
        at = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False)
        if special:
            tok.add_special_tokens([at])
        else:
            tok.add_tokens([at])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)]
    )
    return tok
