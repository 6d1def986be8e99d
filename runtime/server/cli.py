"""`kt-serve PACKED`: serve a packed folder over HTTP (OpenAI and Ollama APIs, a chat page at /)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ktpack.layouts.errors import ManifestError

from ..chat import ChatError
from ..engine import KV_CACHE_TYPES, EngineError


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("packed", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--model-name", default=None, help="Name the APIs report and accept [default: the folder's name].")
@click.option(
    "--api-key",
    envvar="KT_SERVE_API_KEY",
    default=None,
    help="Require `Authorization: Bearer KEY` on /v1 and /api (also read from $KT_SERVE_API_KEY).",
)
@click.option("--max-queue", default=32, show_default=True, type=click.IntRange(0), help="Requests that may wait.")
@click.option("--ctx-size", default=4096, show_default=True, type=click.IntRange(1), help="KV cache length.")
@click.option("--prefill-chunk", default=256, show_default=True, type=click.IntRange(1))
@click.option("--verify", is_flag=True, help="Check every checksum of the packed folder before loading.")
@click.option(
    "--kv-cache",
    type=click.Choice(list(KV_CACHE_TYPES)),
    default="f32",
    show_default=True,
    help="CPU runs: KV cache element type (f16 or bf16 halve it; f16 needs F16C; see kt-run --help).",
)
@click.option("--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning"]))
def main(packed: Path, host: str, port: int, model_name: str | None, api_key: str | None, max_queue: int,
         ctx_size: int, prefill_chunk: int, verify: bool, kv_cache: str, log_level: str) -> None:  # fmt: skip
    """Serve a packed folder: OpenAI /v1/chat/completions, /v1/completions, /v1/models; Ollama
    /api/chat, /api/generate, /api/tags, /api/show; /health; a chat page at /.

    \b
    Examples:
      kt-serve packed/                                   # http://127.0.0.1:8080/
      kt-serve packed/ --port 11434 --model-name deepseek-r1
      kt-serve packed/ --host 0.0.0.0 --api-key "$(openssl rand -hex 16)"
    """
    import uvicorn

    from .app import create_app

    try:
        app = create_app(
            packed,
            model_name=model_name,
            api_key=api_key,
            max_queue=max_queue,
            ctx_size=ctx_size,
            prefill_chunk=prefill_chunk,
            verify=verify,
            kv_cache=kv_cache,
        )
    except (ManifestError, EngineError, ChatError, ValueError, OSError) as e:
        click.echo(f"kt-serve: error: {e}", err=True)
        sys.exit(1)
    st = app.state.kt
    try:
        st.engine.settle_torch_threads()
    except EngineError as e:
        click.echo(f"kt-serve: error: {e}", err=True)
        sys.exit(1)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        click.echo(f"kt-serve: warning: listening on {host} without --api-key", err=True)
    click.echo(f"kt-serve: serving `{st.model_name}` (ctx {ctx_size}) on http://{host}:{port}/", err=True)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            st.scheduler.shutdown()  # end the streams first, so that their connections close at once
            await super().shutdown(sockets=sockets)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
    Server(config).run()


if __name__ == "__main__":
    main()
