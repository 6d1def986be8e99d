"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions (SSE or one JSON).

Extensions: `top_k`, `repetition_penalty`, `ignore_eos` in the body; `timings` (llama.cpp's
figures) in the final chunk and in non-streamed replies. Unsupported: `n` > 1, logprobs, tools.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from .core import (
    APIError,
    Cancelled,
    Delta,
    Done,
    Failed,
    GenRequest,
    JobStream,
    ServerState,
    chat_messages,
    check_key,
    check_model,
    check_prompt,
    collect,
    failure,
    get,
    max_tokens,
    read_json,
    sampling,
    state,
    stop_list,
    submit,
    timings,
    tokenize,
    usage,
)
from .scheduler import Job

router = APIRouter(dependencies=[Depends(check_key)])
FINGERPRINT = "ktpack"


def _model_card(st: ServerState) -> dict[str, Any]:
    return {"id": st.model_name, "object": "model", "created": st.created, "owned_by": "ktpack"}


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [_model_card(state(request))]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request) -> dict:
    st = state(request)
    check_model(st, model)
    return _model_card(st)


def _options(data: dict) -> dict[str, Any]:
    """The sampling and length fields both endpoints take."""
    n = get(data, "n", int, 1)
    if n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    if data.get("logprobs") not in (None, False, 0) or data.get("top_logprobs"):
        raise APIError(400, "logprobs are not supported", param="logprobs")
    for k in ("frequency_penalty", "presence_penalty"):
        get(data, k, float)  # accepted (type-checked) and ignored
    limit = get(data, "max_completion_tokens", int, what="max_completion_tokens")
    if limit is None:
        limit = get(data, "max_tokens", int)
    so = get(data, "stream_options", dict, {})
    return {
        "stream": get(data, "stream", bool, False),
        "include_usage": bool(get(so, "include_usage", bool, False, "stream_options.include_usage")),
        "limit": limit,
        "params": sampling(
            get(data, "temperature", float),
            get(data, "top_p", float),
            get(data, "top_k", int),
            get(data, "repetition_penalty", float),
            get(data, "seed", int),
        ),
        "stop": stop_list(data.get("stop")),
        "ignore_eos": get(data, "ignore_eos", bool, False),
    }


def _start(st: ServerState, ids: list[int], o: dict[str, Any]) -> Job:
    check_prompt(st, ids)
    limit = max_tokens(st, o["limit"], len(ids), "max_tokens")
    return submit(st, GenRequest(ids, o["params"], limit, o["stop"], o["ignore_eos"]))


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _events(
    st: ServerState, job: Job, head: dict, choice: Any, include_usage: bool, first: str | None
) -> AsyncIterator[str]:
    """One SSE stream for both endpoints: `choice(text, finish)` makes a chunk's choice."""

    def chunk(c: list, **extra: Any) -> str:
        d = head | {"choices": c} | extra
        if include_usage:
            d.setdefault("usage", None)
        return _sse(d)

    if first is not None:
        yield chunk([choice(first, None, role=True)])
    async for ev in job.stream():
        if isinstance(ev, Delta):
            yield chunk([choice(ev.text, None)])
        elif isinstance(ev, Done):
            yield chunk([choice("", ev.gen.finish_reason, final=True)], timings=timings(ev))
            if include_usage:
                yield chunk([], usage=usage(ev), timings=timings(ev))
        elif isinstance(ev, Failed):
            yield _sse(failure(ev).body())
        elif isinstance(ev, Cancelled):
            return
    yield "data: [DONE]\n\n"


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    st = state(request)
    data = await read_json(request)
    check_model(st, data.get("model"))
    msgs = chat_messages(data.get("messages"))
    if data.get("tools"):
        raise APIError(400, "tools are not supported", param="tools")
    o = _options(data)
    ids = await tokenize(st, st.engine.tokenizer.encode_chat, msgs)
    job = _start(st, ids, o)
    head = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": st.model_name,
        "system_fingerprint": FINGERPRINT,
    }
    if o["stream"]:

        def choice(text: str, finish: str | None, role: bool = False, final: bool = False) -> dict:
            delta = {} if final else ({"role": "assistant", "content": text} if role else {"content": text})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        return JobStream(_events(st, job, head, choice, o["include_usage"], ""), st, job, "text/event-stream")
    done = await collect(request, st, job)
    return JSONResponse(
        head
        | {
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": done.text},
                    "logprobs": None,
                    "finish_reason": done.gen.finish_reason,
                }
            ],
            "usage": usage(done),
            "timings": timings(done),
        }
    )


async def _prompt_ids(st: ServerState, prompt: Any) -> list[int]:
    """`prompt`: a string (BOS added as the tokenizer config says), token ids, or a one-item list of either."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return await tokenize(st, st.engine.tokenizer.encode_raw, prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise APIError(400, "only one prompt per request is supported", param="prompt")
    raise APIError(400, "`prompt` must be a string or a list of token ids", param="prompt")


@router.post("/v1/completions")
async def completions(request: Request):
    st = state(request)
    data = await read_json(request)
    check_model(st, data.get("model"))
    if data.get("echo") or data.get("suffix"):
        raise APIError(400, "echo and suffix are not supported", param="echo" if data.get("echo") else "suffix")
    o = _options(data)
    ids = await _prompt_ids(st, data.get("prompt"))
    job = _start(st, ids, o)
    head = {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": st.model_name,
        "system_fingerprint": FINGERPRINT,
    }
    if o["stream"]:

        def choice(text: str, finish: str | None, role: bool = False, final: bool = False) -> dict:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        return JobStream(_events(st, job, head, choice, o["include_usage"], None), st, job, "text/event-stream")
    done = await collect(request, st, job)
    return JSONResponse(
        head
        | {
            "choices": [{"index": 0, "text": done.text, "logprobs": None, "finish_reason": done.gen.finish_reason}],
            "usage": usage(done),
            "timings": timings(done),
        }
    )
