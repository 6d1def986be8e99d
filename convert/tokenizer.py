"""Rebuild a Hugging Face `tokenizers` tokenizer from GGUF tokenizer metadata.

Only byte-level BPE (``tokenizer.ggml.model == "gpt2"``) with DeepSeek-V3's pre-tokenizer is
supported, which is what llama.cpp writes for DeepSeek-V3/R1 (``tokenizer.ggml.pre`` =
``"deepseek-v3"``).
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

# GGUF token types (llama.cpp's llama_token_type)
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

# The three Split regexes of DeepSeek-V3's tokenizer.json pre_tokenizer (CR/LF are literal chars).
DEEPSEEK_V3_DIGITS = r"\p{N}{1,3}"
DEEPSEEK_V3_CJK = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
DEEPSEEK_V3_MAIN = (
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+"
    "|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\r\n]*"
    "|\\s*[\r\n]+"
    "|\\s+(?!\\S)"
    "|\\s+"
)

# `tokenizer.ggml.pre` values handled by deepseek_v3_pre_tokenizer()
DEEPSEEK_PRE = ("deepseek-v3", "deepseek-llm")


def deepseek_v3_pre_tokenizer() -> pre_tokenizers.Sequence:
    """The pre-tokenizer of DeepSeek-V3's tokenizer.json."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(DEEPSEEK_V3_DIGITS), behavior="isolated", invert=False),
            pre_tokenizers.Split(Regex(DEEPSEEK_V3_CJK), behavior="isolated", invert=False),
            pre_tokenizers.Split(Regex(DEEPSEEK_V3_MAIN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )


def _split_merge(m: str | Sequence[str]) -> tuple[str, str]:
    if isinstance(m, str):
        a, sep, b = m.partition(" ")
        if not sep or not a or not b:
            raise ValueError(f"bad BPE merge {m!r}")
        return a, b
    a, b = m
    return str(a), str(b)


def build_tokenizer(tokens: list[str], merges: list[str], token_types: list[int], pre: str) -> Tokenizer:
    """Byte-level BPE tokenizer from GGUF ``tokenizer.ggml.*`` arrays.

    Tokens of type CONTROL (3) become special added tokens, USER_DEFINED (4) non-special added
    tokens; everything else is BPE vocabulary.  No post-processor (BOS) is set here.
    """
    if pre not in DEEPSEEK_PRE:
        raise ValueError(f"unsupported tokenizer.ggml.pre {pre!r} (supported: {', '.join(DEEPSEEK_PRE)})")
    if len(token_types) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(token_types)} token types")
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("duplicate token strings in tokenizer.ggml.tokens")
    bpe = models.BPE(
        vocab=vocab,
        merges=[_split_merge(m) for m in merges],
        fuse_unk=False,
        byte_fallback=False,
        ignore_merges=False,
    )
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = deepseek_v3_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    added = []
    for i, (t, ty) in enumerate(zip(tokens, token_types, strict=True)):
        if ty in (TOKEN_CONTROL, TOKEN_USER_DEFINED):
            added.append((i, AddedToken(t, special=ty == TOKEN_CONTROL, normalized=False, lstrip=False, rstrip=False)))
    # All are in the vocab already, so their ids are kept. One call per kind: adding tokens one at a
    # time rebuilds the added-token matcher each time (quadratic; minutes for R1-sized vocabularies).
    ordered = [at for _, at in sorted(added, key=lambda p: p[0])]
    tok.add_special_tokens([at for at in ordered if at.special])
    tok.add_tokens([at for at in ordered if not at.special])
    return tok


def _as_list(v: object) -> list:
    if v is None:
        return []
    if hasattr(v, "tolist"):
        return list(v.tolist())  # numpy arrays
    return list(v)  # type: ignore[call-overload]


def tokenizer_from_gguf_fields(fields: dict[str, object]) -> tuple[Tokenizer, dict]:
    """Tokenizer plus a tokenizer_config.json-style dict from GGUF metadata (key -> python value)."""
    model = fields.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"unsupported tokenizer.ggml.model {model!r} (only 'gpt2' byte-level BPE)")
    tokens = [str(t) for t in _as_list(fields["tokenizer.ggml.tokens"])]
    merges = [str(m) for m in _as_list(fields.get("tokenizer.ggml.merges"))]
    types = [int(t) for t in _as_list(fields.get("tokenizer.ggml.token_type"))] or [TOKEN_NORMAL] * len(tokens)
    pre = str(fields.get("tokenizer.ggml.pre", "default"))
    tok = build_tokenizer(tokens, merges, types, pre)

    def tok_str(key: str) -> str | None:
        v = fields.get(key)
        if v is None:
            return None
        i = int(v)  # type: ignore[call-overload]
        return tokens[i] if 0 <= i < len(tokens) else None

    bos = tok_str("tokenizer.ggml.bos_token_id")
    eos = tok_str("tokenizer.ggml.eos_token_id")
    pad = tok_str("tokenizer.ggml.padding_token_id")
    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", bos is not None))
    add_eos = bool(fields.get("tokenizer.ggml.add_eos_token", False))

    single = ([bos] if add_bos and bos else []) + ["$A"] + ([eos] if add_eos and eos else [])
    pair = single + [s if s != "$A" else "$B" for s in single]
    if len(single) > 1:
        specials = [(t, tokens.index(t)) for t in dict.fromkeys([bos, eos]) if t]
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join(single), pair=" ".join(pair), special_tokens=specials
        )
    config: dict[str, object] = {
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    tmpl = fields.get("tokenizer.chat_template")
    if tmpl is not None:
        config["chat_template"] = str(tmpl)
    return tok, config
