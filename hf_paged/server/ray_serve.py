"""The OpenAI-compatible server as a Ray Serve deployment: ``serve run`` scales engine replicas.

Each Serve replica loads the model, builds one `Engine` (on a GPU of its own when Ray has them) and
serves the very app of ``hf-paged serve`` (`build_app`); Ray Serve's HTTP proxy spreads requests
over the replicas, and its ``num_replicas`` / ``autoscaling_config`` decide how many run. Needs
``pip install 'hf-paged[serve,ray]'``.

From the shell (Ray Serve's application builder; every argument is ``key=value``)::

    serve run hf_paged.server.ray_serve:build model=path/to/model num_replicas=2

From Python::

    from ray import serve
    from hf_paged.server.ray_serve import openai_deployment

    serve.run(openai_deployment("path/to/model", num_replicas=2), route_prefix="/")
    # POST http://127.0.0.1:8000/v1/chat/completions
"""

from __future__ import annotations

import importlib
import os
from typing import Any

__all__ = ["OpenAIServer", "build", "openai_deployment"]


class OpenAIServer:
    """One Serve replica: a model, its `Engine`, and the server's FastAPI app over them.

    Args:
        model: a ``save_pretrained`` directory or hub id (model and tokenizer).
        engine_kwargs: `Engine` arguments (``num_blocks``, ``max_num_seqs``, ...).
        model_kwargs: `hf_paged.loader.load_model` arguments (``dtype``, ``device``).
        server_config: `ServerConfig` fields (``model_name`` defaults to the directory's name).
    """

    def __init__(self, model: str, engine_kwargs: dict | None = None, model_kwargs: dict | None = None,
                 server_config: dict | None = None) -> None:
        from ..engine import Engine
        from ..loader import load_model
        from .config import ServerConfig

        lm, self.tokenizer = load_model(model, **(model_kwargs or {}))
        self.engine = Engine(lm, tokenizer=self.tokenizer, **(engine_kwargs or {}))
        config = dict(server_config or {})
        config.setdefault("model_name", os.path.basename(os.path.normpath(model)))
        self.config = ServerConfig(**config)

    def __serve_build_asgi_app__(self):
        """The replica's ASGI app (Ray Serve calls this after the constructor)."""
        from .app import build_app

        return build_app(self.engine, self.tokenizer, self.config)


def openai_deployment(model: str, *, num_replicas: int | str = 1, num_gpus: float | None = None,
                      engine_kwargs: dict | None = None, model_kwargs: dict | None = None,
                      server_config: dict | None = None, **deployment_options: Any):
    """A bound Ray Serve application of ``num_replicas`` `OpenAIServer` replicas (``"auto"``: autoscaled).

    ``num_gpus`` per replica defaults to 1 when the Ray cluster has GPUs, else 0;
    ``deployment_options`` go to ``serve.deployment`` (``autoscaling_config``, ``max_ongoing_requests``...).

    Example:
        >>> serve.run(openai_deployment("path/to/model", num_replicas=2))  # doctest: +SKIP
    """
    serve = _require_serve()
    import ray

    if num_gpus is None:
        if not ray.is_initialized():
            ray.init()
        num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    deployment = serve.deployment(
        serve.ingress()(OpenAIServer), name="hf-paged-openai", num_replicas=num_replicas,
        ray_actor_options={"num_gpus": num_gpus}, **deployment_options,
    )
    return deployment.bind(model, engine_kwargs, model_kwargs, server_config)


def build(args: dict[str, str]):
    """Ray Serve's application builder (``serve run hf_paged.server.ray_serve:build model=DIR ...``).

    Keys: ``model`` (required), ``num_replicas``, ``num_gpus``, ``dtype``, ``device``,
    ``max_num_seqs``, ``num_blocks``, ``served_model_name``, ``max_model_len``.
    """
    args = dict(args)
    if "model" not in args:
        raise ValueError("serve run hf_paged.server.ray_serve:build needs model=PATH")
    known = {"model", "num_replicas", "num_gpus", "dtype", "device", "max_num_seqs", "num_blocks",
             "served_model_name", "max_model_len"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown arguments {unknown}; known: {sorted(known)}")
    engine_kwargs = {k: int(args[k]) for k in ("max_num_seqs", "num_blocks") if k in args}
    model_kwargs = {k: args[k] for k in ("dtype", "device") if k in args}
    server_config = {"model_name": args["served_model_name"]} if "served_model_name" in args else {}
    if "max_model_len" in args:
        server_config["max_model_len"] = int(args["max_model_len"])
    replicas = args.get("num_replicas", "1")
    return openai_deployment(
        args["model"], num_replicas=replicas if replicas == "auto" else int(replicas),
        num_gpus=float(args["num_gpus"]) if "num_gpus" in args else None,
        engine_kwargs=engine_kwargs, model_kwargs=model_kwargs, server_config=server_config,
    )


def _require_serve():
    try:
        return importlib.import_module("ray.serve")
    except ImportError as e:
        raise ImportError("the Ray Serve deployment needs Ray Serve: pip install 'hf-paged[serve,ray]'") from e
