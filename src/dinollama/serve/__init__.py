"""``dinollama serve``: OpenAI- and llama.cpp-compatible HTTP server over the continuous-batching engine."""

from .app import create_app, serve
from .state import ServeConfig

__all__ = ["ServeConfig", "create_app", "serve"]
