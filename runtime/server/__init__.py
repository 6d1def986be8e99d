"""kt-serve: an OpenAI- and Ollama-compatible HTTP server with a chat page, over one Engine."""

from .app import create_app

__all__ = ["create_app"]
