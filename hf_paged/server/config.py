"""`ServerConfig`: what the HTTP layer needs to know besides the engine."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ServerConfig"]


@dataclass
class ServerConfig:
    """Settings of one server.

    Args:
        model_name: the name clients pass as ``model`` (others get 404).
        max_model_len: prompt plus generated tokens allowed per request; ``None``: the model's
            ``max_position_embeddings``. Capped to what the KV pool holds.
        api_key: when set, ``/v1/*`` requires ``Authorization: Bearer <api_key>``.
        max_waiting: requests allowed to wait for their first token before answering 429
            (``None``: unbounded).
        chat_template: a Jinja chat template overriding the tokenizer's.
        max_logprobs: largest ``logprobs`` / ``top_logprobs`` accepted.
        max_n: largest ``n`` (samples per prompt) accepted.
        max_request_bytes: largest request body accepted (413 above it).
        allow_long_max_model_len: accept a ``max_model_len`` above the model's
            ``max_position_embeddings`` (refused otherwise, as positions past it are untrained).
    """

    model_name: str
    max_model_len: int | None = None
    api_key: str | None = None
    max_waiting: int | None = None
    chat_template: str | None = None
    max_logprobs: int = 20
    max_n: int = 64
    max_request_bytes: int = 16 * 2**20
    allow_long_max_model_len: bool = False

