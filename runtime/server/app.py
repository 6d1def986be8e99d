"""The FastAPI app: OpenAI and Ollama routes over one scheduler, the chat page at /, /health.

    app = create_app("packed/", model_name="deepseek-r1", api_key=None, max_queue=32, ctx_size=4096)
    uvicorn.run(app, host="127.0.0.1", port=8080)

With an API key, the /v1 and /api routes need `Authorization: Bearer KEY`; / and /health stay
open (the page asks for the key and sends it with its own requests).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine
from . import ollama_api, openai_api
from .core import APIError, ServerState
from .scheduler import Scheduler

log = logging.getLogger("ktpack.server")


def _size_label(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))


def pack_info(folder: Path) -> dict[str, Any]:
    """Figures for /api/tags and /api/show, read from manifest.json (best effort)."""
    info: dict[str, Any] = {}
    path = folder / "manifest.json"
    try:
        raw = path.read_bytes()
        m = json.loads(raw)
    except (OSError, ValueError):
        return info
    info["digest"] = "sha256:" + hashlib.sha256(raw).hexdigest()
    info["modified_at"] = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat().replace("+00:00", "Z")
    files = m.get("files") or []
    info["size"] = int(sum(f.get("size", 0) for f in files if isinstance(f, dict)))
    tensors = [t for t in m.get("tensors") or [] if isinstance(t, dict)]
    n = sum(math.prod(t.get("shape") or [0]) for t in tensors)
    info["parameter_count"] = int(n)
    info["parameter_size"] = _size_label(n)
    kinds = collections.Counter(t.get("source_dtype") for t in tensors if t.get("role") != "norm")
    if kinds:
        info["quantization_level"] = str(kinds.most_common(1)[0][0])
    return info


def _page() -> str:
    return resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")


def create_app(
    engine_or_folder: Engine | Path | str,
    model_name: str | None = None,
    api_key: str | None = None,
    max_queue: int = 32,
    ctx_size: int = 4096,
    prefill_chunk: int = 256,
    verify: bool = False,
    kv_cache: str = "f32",
) -> FastAPI:
    """An app serving one packed model. Given a folder, the Engine is made here (ctx_size,
    prefill_chunk, verify and kv_cache apply); given an Engine, it is used as it is, and must not be used by
    anything else while the app runs (it has one KV cache)."""
    if isinstance(engine_or_folder, Engine):
        engine = engine_or_folder
    else:
        engine = Engine(
            engine_or_folder, ctx_size=ctx_size, prefill_chunk=prefill_chunk, verify=verify, kv_cache=kv_cache
        )
    if max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {max_queue}")
    engine.tokenizer  # noqa: B018 - load it now: a folder without one fails here, not on the first request
    name = model_name or engine.folder.resolve().name
    st = ServerState(engine, Scheduler(engine, max_queue), name, api_key or None, info=pack_info(engine.folder))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        st.scheduler.start()
        try:
            yield
        finally:
            await st.scheduler.stop()

    app = FastAPI(title="kt-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.kt = st

    def _error(request: Request, err: APIError) -> JSONResponse:
        ollama = request.url.path.startswith("/api/")
        return JSONResponse(err.body(ollama), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        msg = f"{request.method} {request.url.path}: {exc.detail}"
        return _error(request, APIError(exc.status_code, msg, kind, headers=dict(exc.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(request, APIError(400, f"invalid request: {exc.errors()}"))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("kt-serve: internal error on %s", request.url.path)
        return _error(request, APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"))

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(_page())

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/health")
    async def health() -> dict:
        s = st.scheduler
        return {
            "status": "ok",
            "model": st.model_name,
            "ctx_size": engine.ctx_size,
            "auth": st.api_key is not None,
            "running": s.running is not None,
            "queued": len(s.pending),
            "max_queue": s.max_queue,
            "served": s.served,
            "cancelled": s.cancelled,
            "rejected": s.rejected,
        }

    app.include_router(openai_api.router)
    app.include_router(ollama_api.router)
    return app


__all__ = ["create_app", "pack_info"]
