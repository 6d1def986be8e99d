"""Sampling, chat template and streamed text: the parts of kt-run around the model.

Oracles: transformers' logits processors (repetition penalty, top-k, top-p) and its tokenizer's
`apply_chat_template` on the test checkpoint; the tokenizer's own one-shot decode for streaming.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ktpack.runtime.chat import ChatTokenizer, StreamDecoder
from ktpack.runtime.engine import _stop_cut
from ktpack.runtime.sampling import Sampler, SamplingParams


def test_greedy_is_argmax():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert Sampler(SamplingParams(temperature=0))(logits) == int(logits.argmax())
    assert Sampler(SamplingParams(temperature=1.0, top_k=1, seed=3))(logits) == int(logits.argmax())


def test_seed_reproducible_and_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0])
    a = [Sampler(SamplingParams(temperature=1.0, seed=7))(logits) for _ in range(3)]
    assert len(set(a)) == 1
    s = Sampler(SamplingParams(temperature=1.0, seed=1))
    counts = np.bincount([s(logits) for _ in range(4000)], minlength=4) / 4000
    want = torch.softmax(logits, 0).numpy()
    assert np.abs(counts - want).max() < 0.03


@pytest.mark.parametrize("penalty,top_k,top_p", [(1.3, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.8), (1.2, 7, 0.9)])
def test_filters_match_transformers(penalty, top_k, top_p):
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(50, generator=g) * 3
    history = torch.tensor([1, 4, 4, 9, 30])
    x = logits[None].clone()
    if penalty != 1.0:
        x = RepetitionPenaltyLogitsProcessor(penalty)(history[None], x)
    x = TemperatureLogitsWarper(0.7)(history[None], x)
    if top_k:
        x = TopKLogitsWarper(top_k)(history[None], x)
    if top_p < 1:
        x = TopPLogitsWarper(top_p)(history[None], x)
    want = torch.softmax(x[0], -1)
    # our sampler's distribution, read off many seeded draws
    s = Sampler(SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p, repetition_penalty=penalty, seed=0))
    draws = np.bincount([s(logits, history) for _ in range(3000)], minlength=50) / 3000
    assert set(np.nonzero(draws)[0]) <= set(np.nonzero(want.numpy() > 0)[0])  # never outside the kept set
    assert np.abs(draws - want.numpy()).max() < 0.04


def test_chat_template_matches_transformers(tiny_dir, tmp_path):
    from transformers import AutoTokenizer

    from ktpack.convert.gguf_source import open_gguf

    # the packed folder's tokenizer files are exactly what kt-convert writes from the GGUF
    for name, content in open_gguf(tiny_dir / "tiny-Q8_0.gguf").tokenizer_files().items():
        (tmp_path / name).write_bytes(content)
    ours = ChatTokenizer.from_folder(tmp_path)
    hf = AutoTokenizer.from_pretrained(tiny_dir / "hf")
    convs = [
        [{"role": "user", "content": "Hello there!"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
        [
            {"role": "user", "content": "Hi 你好 🙂"},
            {"role": "assistant", "content": "<think>hmm</think>Hello."},
            {"role": "user", "content": "def f(x):\n    return x"},
        ],
    ]
    for msgs in convs:
        want = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
        assert ours.encode_chat(msgs) == list(want)


def test_stream_decoder_reassembles_text(tiny_dir):
    tok = ChatTokenizer.from_folder(tiny_dir / "hf")
    text = "Grüße, 世界! 🙂🚀 code: x = [1, 2, 3]\n\tdone"
    ids = tok.tok.encode(text, add_special_tokens=False).ids
    d = StreamDecoder(tok)
    pieces = [d.push(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_cut():
    assert _stop_cut("hello world", ["wor"], 6) == 6
    assert _stop_cut("hello world", ["xyz"], 0) is None
    assert _stop_cut("abcSTOP", ["STOP", "bc"], 5) == 3  # the earliest stop that ends in new text
