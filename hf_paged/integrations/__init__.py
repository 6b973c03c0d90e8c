"""Plugins that let other frameworks run their generation through hf_paged's `Engine`.

One module per framework, each declared under that framework's entry-point group in
``pyproject.toml`` (they live inside the package so that the entry points resolve after a plain
``pip install hf-paged[<extra>]``):

* `hf_paged.integrations.lm_eval`: model ``hf-paged`` for lm-evaluation-harness (extra ``lm-eval``).
* `hf_paged.integrations.inspect_ai`: model API ``hf_paged`` for Inspect (extra ``inspect``).
* `hf_paged.integrations.llm`: models for Simon Willison's ``llm`` CLI (extra ``llm``).
* `hf_paged.integrations.trl`: a ``rollout_func`` for TRL's ``GRPOTrainer`` (extra ``trl``).

Importing one of them without its framework raises an ``ImportError`` naming the extra; nothing
outside this package imports these frameworks.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise an ``ImportError`` that says which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"this hf_paged integration needs the {module!r} package: pip install 'hf-paged[{extra}]'"
        ) from e
