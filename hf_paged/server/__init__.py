"""OpenAI-compatible HTTP server for the continuous-batching `hf_paged.Engine` (``hf-paged serve``).

Needs the ``serve`` extra (``pip install hf-paged[serve]``); ``import hf_paged`` alone never
imports it. Layout:

- `protocol`: pydantic models of every request and response (OpenAI shapes).
- `serving`: the completion/chat handlers (validation, prompts, responses, SSE).
- `app`: the FastAPI application (routes, auth, body limit, errors, lifespan).
- `logprobs`: token logprobs in OpenAI's shapes.
- `metrics`: Prometheus metrics (a sink of the engine's client); `cli`: ``hf-paged serve``; `api_servers`:
  running the app (one uvicorn server, or N front-end processes over one engine process); `demo`: an offline
  random model.
"""

from ._deps import require_serve_deps

require_serve_deps()

from .app import ServerConfig, build_app  # noqa: E402

__all__ = ["ServerConfig", "build_app"]
