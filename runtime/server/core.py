"""What the OpenAI and Ollama routes share: the server's state, errors, request checks, and the
two ways to wait for a job (a stream that ends when the client goes away, or a collected reply)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..chat import ChatError
from ..engine import Engine, EngineError
from ..sampling import SamplingParams
from .scheduler import Cancelled, Delta, Done, Failed, GenRequest, Job, QueueFull, Scheduler, ShuttingDown


class APIError(Exception):
    """Answered as JSON: OpenAI's {"error": {"message", "type", "code"}} on /v1 and the other
    routes, Ollama's {"error": "message"} on /api."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self, ollama: bool = False) -> dict:
        if ollama:
            return {"error": self.message}
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


@dataclass
class ServerState:
    engine: Engine
    scheduler: Scheduler
    model_name: str
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    info: dict[str, Any] = field(default_factory=dict)


def state(request: Request) -> ServerState:
    return request.app.state.kt


async def check_key(request: Request) -> None:
    """FastAPI dependency of the /v1 and /api routes: with --api-key, `Authorization: Bearer KEY`."""
    key = state(request).api_key
    if not key:
        return
    got = request.headers.get("authorization", "")
    scheme, _, token = got.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        msg = "missing API key (Authorization: Bearer KEY)" if not got else "invalid API key"
        raise APIError(401, msg, "authentication_error", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def read_json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return data


def check_model(st: ServerState, name: Any) -> None:
    """One model is served; an empty or missing name means it, as does Ollama's `NAME:latest`."""
    if name is None or name == "":
        return
    if not isinstance(name, str):
        raise APIError(400, "`model` must be a string", param="model")
    if name not in (st.model_name, f"{st.model_name}:latest"):
        raise APIError(
            404, f"the model `{name}` does not exist; this server has `{st.model_name}`", code="model_not_found"
        )


def get(data: dict, key: str, kind: type | tuple[type, ...], default: Any = None, what: str | None = None) -> Any:
    """data[key] if present and not null, checked against `kind` (bool is not an int here)."""
    v = data.get(key)
    if v is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(v, kinds) and not (isinstance(v, bool) and bool not in kinds)
    if float in kinds and isinstance(v, int) and not isinstance(v, bool):
        ok, v = True, float(v)
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        raise APIError(400, f"`{what or key}` must be {names}, got {json.dumps(v)[:80]}", param=what or key)
    return v


def stop_list(v: Any, what: str = "stop") -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return tuple(s for s in v if s)
    raise APIError(400, f"`{what}` must be a string or a list of strings", param=what)


def sampling(
    temperature: float | None, top_p: float | None, top_k: int | None, penalty: float | None, seed: int | None
) -> SamplingParams:
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise APIError(400, f"`seed` must fit in 64 bits, got {seed}", param="seed")
    d = SamplingParams()
    p = SamplingParams(
        temperature=d.temperature if temperature is None else temperature,
        top_k=d.top_k if top_k is None else top_k,
        top_p=d.top_p if top_p is None else top_p,
        repetition_penalty=d.repetition_penalty if penalty is None else penalty,
        seed=seed,
    )
    try:
        p.check()
    except ValueError as e:
        raise APIError(400, str(e)) from None
    return p


def message_text(content: Any, i: int) -> str:
    """A message's content: a string, or OpenAI's list of parts of which only text is read."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                out.append(part["text"])
            else:
                raise APIError(400, f"messages[{i}]: only text content parts are supported", param="messages")
        return "".join(out)
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")


def chat_messages(v: Any) -> list[dict[str, str]]:
    if not isinstance(v, list) or not v:
        raise APIError(400, "`messages` must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a string `role`", param="messages")
        role = m["role"]
        if role == "developer":  # OpenAI's newer name for system
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}]: role `{role}` is not supported", param="messages")
        out.append({"role": role, "content": message_text(m.get("content"), i)})
    return out


async def tokenize(st: ServerState, fn: Callable[..., list[int]], *args: Any) -> list[int]:
    """Runs a tokenizer call off the event loop; template errors become 400."""
    try:
        return await anyio.to_thread.run_sync(fn, *args)
    except ChatError as e:
        raise APIError(400, str(e)) from None


def check_prompt(st: ServerState, ids: list[int]) -> None:
    eng = st.engine
    if len(ids) > eng.ctx_size:
        raise APIError(
            400,
            f"this model's maximum context length is {eng.ctx_size} tokens, but the prompt has {len(ids)} tokens",
            code="context_length_exceeded",
            param="messages",
        )
    try:
        eng.check_ids(ids)
    except EngineError as e:
        raise APIError(400, str(e), param="prompt") from None


def max_tokens(st: ServerState, value: int | None, n_prompt: int, what: str = "max_tokens") -> int:
    """Tokens to generate: at most what is left of the context; None means all of it."""
    room = max(1, st.engine.ctx_size - n_prompt)
    if value is None:
        return room
    if value < 0:
        raise APIError(400, f"`{what}` must be >= 0, got {value}", param=what, code="invalid_value")
    return min(value, room)


def submit(st: ServerState, req: GenRequest) -> Job:
    try:
        return st.scheduler.submit(req)
    except ShuttingDown as e:
        raise APIError(503, str(e), "server_error", "shutting_down") from None
    except QueueFull as e:
        retry = st.scheduler.retry_after()
        raise APIError(
            503,
            f"the server is busy: {e}; retry later",
            "server_busy",
            "queue_full",
            headers={"Retry-After": str(retry)},
        ) from None


def failure(ev: Failed) -> APIError:
    if isinstance(ev.error, ShuttingDown):
        return APIError(503, str(ev.error), "server_error", "shutting_down")
    if isinstance(ev.error, (EngineError, ValueError)):
        return APIError(400, str(ev.error))
    return APIError(500, f"generation failed: {type(ev.error).__name__}: {ev.error}", "server_error")


async def collect(request: Request, st: ServerState, job: Job) -> Done:
    """Waits for a job's end; if the client disconnects meanwhile, the job is cancelled."""

    async def watch() -> None:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                st.scheduler.cancel(job)
                return

    watcher = asyncio.ensure_future(watch())
    try:
        async for ev in job.stream():
            if isinstance(ev, Done):
                return ev
            if isinstance(ev, Failed):
                raise failure(ev)
            if isinstance(ev, Cancelled):
                raise APIError(400, "the request was cancelled", code="cancelled")
        raise APIError(500, "the generation ended without a result", "server_error")
    finally:
        watcher.cancel()
        st.scheduler.cancel(job)


class JobStream(StreamingResponse):
    """A streamed reply that watches for the client leaving whatever the ASGI server's version, and
    cancels its job then (a queued job leaves the queue at once)."""

    def __init__(self, content: AsyncIterator[str], st: ServerState, job: Job, media_type: str):
        super().__init__(
            content, media_type=media_type, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self.st, self.job = st, job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def run() -> None:
                    with contextlib.suppress(OSError):
                        await self.stream_response(send)
                    tg.cancel_scope.cancel()

                tg.start_soon(run)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            self.st.scheduler.cancel(self.job)
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()


def timings(done: Done) -> dict[str, Any]:
    """llama.cpp-style figures (the chat page reads predicted_per_second)."""
    s = done.gen.stats
    return {
        "prompt_n": s.prompt_tokens,
        "prompt_ms": s.prefill_s * 1e3,
        "prompt_per_second": s.prefill_tok_s,
        "predicted_n": s.generated_tokens,
        "predicted_ms": s.decode_s * 1e3,
        "predicted_per_second": s.decode_tok_s,
        "queued_ms": done.queued_s * 1e3,
    }


def usage(done: Done) -> dict[str, int]:
    p, c = len(done.gen.prompt_ids), len(done.gen.output_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


__all__ = [
    "APIError",
    "Cancelled",
    "Delta",
    "Done",
    "Failed",
    "GenRequest",
    "JobStream",
    "ServerState",
]
