"""Check for the optional ``serve`` dependencies with an actionable message."""

from __future__ import annotations

import importlib.util

__all__ = ["require_serve_deps"]

# Module name -> distribution name.
_SERVE_DEPS = {
    "fastapi": "fastapi", "uvicorn": "uvicorn", "pydantic": "pydantic", "prometheus_client": "prometheus-client",
}


def require_serve_deps() -> None:
    """Raise ``ImportError`` naming the missing packages of the ``serve`` extra, if any."""
    missing = [dist for module, dist in _SERVE_DEPS.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ImportError(
            f"hf-paged serve needs {', '.join(missing)}; install the server extra: pip install 'hf-paged[serve]'"
        )
    import pydantic

    if int(pydantic.VERSION.split(".")[0]) < 2:
        raise ImportError(
            f"hf-paged serve needs pydantic>=2 (found {pydantic.VERSION}); pip install 'hf-paged[serve]'"
        )
