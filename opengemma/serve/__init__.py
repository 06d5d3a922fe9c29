"""``opengemma serve``: an OpenAI-compatible HTTP server with continuous batching and streaming.

The serving side of opengemma, in four layers:

* :mod:`.engine` -- one model, one KV cache of ``max_batch`` slots, one thread: admits requests
  into the running decode batch between steps, prefills in chunks, retires finished sequences;
* :mod:`.protocol` -- OpenAI request validation and response shapes (errors as 4xx bodies);
* :mod:`.app` -- the ASGI application: routes, auth, JSON and server-sent events, disconnects;
* :mod:`.cli` -- ``opengemma serve`` arguments and the life cycle (SIGTERM drains, exit 0);
  :mod:`.metrics` renders ``GET /metrics``.

Importing this package is cheap: torch, the model and uvicorn load when the server starts.
"""

from .cli import add_serve_parser, run_serve

__all__ = ["add_serve_parser", "run_serve"]
