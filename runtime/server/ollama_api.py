"""Ollama-compatible routes: /api/tags, /api/show, /api/chat, /api/generate (NDJSON or one JSON).

`options` read: temperature, top_p, top_k, repeat_penalty, seed, num_predict (< 0: up to the
context), stop; others (num_ctx, num_thread, ...) are accepted and ignored, as are `keep_alive`,
`format` and `think`. `stream` defaults to true, as in Ollama. Errors are Ollama's {"error": "..."}.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime, timezone
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
    tokenize,
)
from .scheduler import Job

router = APIRouter(dependencies=[Depends(check_key)])


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _details(st: ServerState) -> dict[str, Any]:
    i = st.info
    return {
        "parent_model": "",
        "format": "ktpack",
        "family": "deepseek2",
        "families": ["deepseek2"],
        "parameter_size": i.get("parameter_size", ""),
        "quantization_level": i.get("quantization_level", ""),
    }


@router.get("/api/tags")
async def tags(request: Request) -> dict:
    st = state(request)
    i = st.info
    return {
        "models": [
            {
                "name": st.model_name,
                "model": st.model_name,
                "modified_at": i.get("modified_at", ""),
                "size": i.get("size", 0),
                "digest": i.get("digest", ""),
                "details": _details(st),
            }
        ]
    }


@router.post("/api/show")
async def show(request: Request) -> dict:
    st = state(request)
    data = await read_json(request)
    name = data.get("model", data.get("name"))
    if not name:
        raise APIError(400, "`model` is required", param="model")
    check_model(st, name)
    cfg = st.engine.config
    tok_cfg = st.engine.tokenizer.config
    return {
        "modelfile": f"# served by kt-serve from {st.engine.folder}\nFROM {st.engine.folder}\n",
        "parameters": "",
        "template": tok_cfg.get("chat_template") or "",
        "details": _details(st),
        "model_info": {
            "general.architecture": "deepseek2",
            "general.parameter_count": st.info.get("parameter_count", 0),
            "deepseek2.context_length": st.engine.ctx_size,
            "deepseek2.embedding_length": cfg.hidden_size,
            "deepseek2.block_count": cfg.num_hidden_layers,
            "deepseek2.vocab_size": cfg.vocab_size,
        },
        "capabilities": ["completion"],
        "modified_at": st.info.get("modified_at", ""),
    }


def _options(data: dict, n_prompt: int, st: ServerState) -> tuple[GenRequest, bool]:
    opts = get(data, "options", dict, {})
    limit = get(opts, "num_predict", int, what="options.num_predict")
    if limit is not None and limit < 0:
        limit = None  # -1: no limit, -2: fill the context
    params = sampling(
        get(opts, "temperature", float, what="options.temperature"),
        get(opts, "top_p", float, what="options.top_p"),
        get(opts, "top_k", int, what="options.top_k"),
        get(opts, "repeat_penalty", float, what="options.repeat_penalty"),
        get(opts, "seed", int, what="options.seed"),
    )
    req = GenRequest(
        [],
        params,
        max_tokens(st, limit, n_prompt, "options.num_predict"),
        stop_list(opts.get("stop"), "options.stop"),
    )
    return req, bool(get(data, "stream", bool, True))


def _final(st: ServerState, done: Done) -> dict[str, Any]:
    s = done.gen.stats
    return {
        "done": True,
        "done_reason": done.gen.finish_reason,
        "total_duration": int(done.total_s * 1e9),
        "load_duration": 0,  # the model is loaded once, at start; total_duration includes queueing
        "prompt_eval_count": s.prompt_tokens,
        "prompt_eval_duration": int(s.prefill_s * 1e9),
        "eval_count": s.generated_tokens,
        "eval_duration": int(s.decode_s * 1e9),
    }


def _loaded(st: ServerState) -> dict[str, Any]:
    return {"model": st.model_name, "created_at": _now(), "done": True, "done_reason": "load"}


def _line(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


async def _ndjson(st: ServerState, job: Job, piece: Any, tail: Any) -> AsyncIterator[str]:
    async for ev in job.stream():
        if isinstance(ev, Delta):
            yield _line({"model": st.model_name, "created_at": _now()} | piece(ev.text) | {"done": False})
        elif isinstance(ev, Done):
            yield _line({"model": st.model_name, "created_at": _now()} | piece("") | _final(st, ev) | tail(ev))
        elif isinstance(ev, Failed):
            yield _line(failure(ev).body(ollama=True))
        elif isinstance(ev, Cancelled):
            return


def _no_images(data: dict) -> None:
    msgs = data.get("messages") if isinstance(data.get("messages"), list) else []
    if data.get("images") or any(isinstance(m, dict) and m.get("images") for m in msgs):
        raise APIError(400, "images are not supported by this model")
    if data.get("tools"):
        raise APIError(400, "tools are not supported", param="tools")


@router.post("/api/chat")
async def chat(request: Request):
    st = state(request)
    data = await read_json(request)
    check_model(st, data.get("model"))
    _no_images(data)
    if data.get("messages") in (None, []):  # Ollama's way to load a model: nothing to generate
        return JSONResponse(_loaded(st) | {"message": {"role": "assistant", "content": ""}})
    msgs = chat_messages(data.get("messages"))
    ids = await tokenize(st, st.engine.tokenizer.encode_chat, msgs)
    check_prompt(st, ids)
    req, stream = _options(data, len(ids), st)
    req.prompt_ids = ids
    job = submit(st, req)

    def piece(text: str) -> dict:
        return {"message": {"role": "assistant", "content": text}}

    if stream:
        return JobStream(_ndjson(st, job, piece, lambda d: {}), st, job, "application/x-ndjson")
    done = await collect(request, st, job)
    return JSONResponse({"model": st.model_name, "created_at": _now()} | piece(done.text) | _final(st, done))


async def _generate_ids(st: ServerState, data: dict, prompt: str) -> list[int]:
    tok = st.engine.tokenizer
    context = get(data, "context", list, [])
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in context):
        raise APIError(400, "`context` must be a list of token ids", param="context")
    if get(data, "raw", bool, False):
        ids = await tokenize(st, tok.encode_raw, prompt)
    else:
        msgs = []
        system = get(data, "system", str)
        if system:
            msgs.append({"role": "system", "content": system})
        msgs.append({"role": "user", "content": prompt})
        ids = await tokenize(st, tok.encode_chat, msgs)
    if context and ids and ids[0] == tok.bos_id:
        ids = ids[1:]  # the context already starts with BOS
    return list(context) + ids


@router.post("/api/generate")
async def generate(request: Request):
    st = state(request)
    data = await read_json(request)
    check_model(st, data.get("model"))
    _no_images(data)
    prompt = get(data, "prompt", str, "")
    if not prompt and not data.get("context"):  # Ollama's way to load a model: nothing to generate
        return JSONResponse(_loaded(st) | {"response": ""})
    ids = await _generate_ids(st, data, prompt)
    check_prompt(st, ids)
    req, stream = _options(data, len(ids), st)
    req.prompt_ids = ids
    job = submit(st, req)

    def piece(text: str) -> dict:
        return {"response": text}

    def tail(done: Done) -> dict:
        return {"context": done.gen.prompt_ids + done.gen.output_ids}

    if stream:
        return JobStream(_ndjson(st, job, piece, tail), st, job, "application/x-ndjson")
    done = await collect(request, st, job)
    return JSONResponse(
        {"model": st.model_name, "created_at": _now()} | piece(done.text) | _final(st, done) | tail(done)
    )
