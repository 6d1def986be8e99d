"""Tokenizer and chat template of a packed folder (tokenizer.json + tokenizer_config.json).

The template is rendered the way transformers renders it (a sandboxed jinja2 environment with
trim_blocks/lstrip_blocks, `raise_exception` and `tojson`), then tokenized without adding special
tokens, since the template writes BOS itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer


class ChatError(ValueError):
    pass


def _raise(msg: str) -> None:
    raise ChatError(msg)


@dataclass
class ChatTokenizer:
    tok: Tokenizer
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_folder(cls, folder: Path | str) -> ChatTokenizer:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.exists():
            raise ChatError(f"{path}: missing (the source had no tokenizer); use --prompt-ids")
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        return cls(Tokenizer.from_file(str(path)), cfg)

    def token_id(self, key: str) -> int | None:
        t = self.config.get(key)
        if isinstance(t, dict):
            t = t.get("content")
        return self.tok.token_to_id(t) if isinstance(t, str) else None

    @property
    def eos_id(self) -> int | None:
        return self.token_id("eos_token")

    @property
    def bos_id(self) -> int | None:
        return self.token_id("bos_token")

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        template = self.config.get("chat_template")
        if not template:
            raise ChatError("the packed folder has no chat template; pass --raw to send the prompt as it is")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)

        def special(key: str) -> str:
            v = self.config.get(key)
            return (v.get("content", "") if isinstance(v, dict) else v) or ""

        return env.from_string(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=special("bos_token"),
            eos_token=special("eos_token"),
        )

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tok.encode(self.render(messages), add_special_tokens=False).ids

    def encode_raw(self, text: str) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if self.config.get("add_bos_token") and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


class StreamDecoder:
    """Turns a growing list of ids into text deltas, holding back bytes of an unfinished UTF-8
    character (shown as U+FFFD by the decoder) until the next token completes it."""

    def __init__(self, tok: ChatTokenizer, skip: set[int] | None = None):
        self.tok, self.ids, self.sent, self.skip = tok, [], "", skip or set()

    def push(self, token: int) -> str:
        if token in self.skip:
            return ""
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta = text[len(self.sent) :]
        self.sent = text
        return delta
