"""OpenAI-compatible HTTP server for the continuous-batching `hf_paged.Engine` (``hf-paged serve``).

Needs the ``serve`` extra (``pip install hf-paged[serve]``); ``import hf_paged`` alone never
imports it. Layout:

- `protocol`: pydantic models of every request and response (OpenAI shapes).
- `engine_loop`: the background thread that owns the `Engine` and streams events to requests.
- `serving`: the completion/chat handlers (validation, prompts, responses, SSE).
- `app`: the FastAPI application (routes, auth, errors, lifespan).
- `metrics`: Prometheus metrics; `cli`: ``hf-paged serve``; `demo`: an offline random model.
"""

from ._deps import require_serve_deps

require_serve_deps()

from .app import ServerConfig, build_app  # noqa: E402
from .engine_loop import EngineLoop  # noqa: E402

__all__ = ["EngineLoop", "ServerConfig", "build_app"]
