"""Pydantic models of the OpenAI-compatible API: requests, responses, stream chunks and errors.

Requests validate strictly (a string where a number belongs is a 400, not a coercion). The request
bodies refuse fields they do not know (a 400 naming the field, as vLLM does), and OpenAI fields this
server does not implement are refused when set to anything but their no-op value (``best_of`` other
than ``n``, ``logit_bias``, ``tools``, ``response_format`` other than text...); pure hints such as
``user`` are accepted and ignored. ``None`` for an optional field means its default, since some
clients send explicit nulls. Nested objects (messages, ``stream_options``) ignore unknown fields, as
clients replay assistant messages with extra keys (``refusal``, ``tool_calls``: null...).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_serializer

__all__ = [
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatChoice",
    "ChatLogprobs",
    "ChatMessage",
    "ChatResponseMessage",
    "ChatStreamChoice",
    "ChatTokenLogprob",
    "CompletionChoice",
    "CompletionLogprobs",
    "CompletionRequest",
    "CompletionResponse",
    "CompletionStreamChoice",
    "CompletionStreamResponse",
    "DeltaMessage",
    "ErrorInfo",
    "ErrorResponse",
    "ModelCard",
    "ModelList",
    "StreamOptions",
    "TopLogprob",
    "Usage",
]

# The prompt forms of /v1/completions: text, texts, token ids, lists of token ids.
PromptInput = str | list[str] | list[int] | list[list[int]]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    """``stream_options``: ``include_usage`` adds a last chunk with the usage and no choices."""

    include_usage: bool | None = False


class _SamplingFields(_Request):
    """Fields shared by completions and chat (OpenAI ones, then the vLLM-style extras)."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    # OpenAI fields accepted and ignored: hints with no effect on the output.
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None
    parallel_tool_calls: Any = None
    # OpenAI fields refused unless null or their no-op value (checked below).
    best_of: Any = None
    logit_bias: Any = None

    model_config = ConfigDict(strict=True, extra="forbid")

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and value != (info.data.get("n") or 1):
            raise ValueError("best_of is not supported (only best_of == n)")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: Any) -> Any:
        if value:
            raise ValueError("logit_bias is not supported")
        return value


def _unsupported(name: str, allowed: tuple = ()):
    """A validator refusing ``name`` unless it is null, empty or one of ``allowed``."""

    def check(cls, value: Any) -> Any:
        if value is None or value == [] or value == {} or value in allowed:
            return value
        raise ValueError(f"{name} is not supported")

    return field_validator(name)(classmethod(check))


class CompletionRequest(_SamplingFields):
    """Body of ``POST /v1/completions``."""

    prompt: PromptInput
    max_tokens: int | None = None
    logprobs: int | None = None
    echo: bool | None = False
    suffix: Any = None

    _check_suffix = _unsupported("suffix", ("",))


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    """One message of ``messages``; list content may hold text parts only."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    """Body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    max_tokens: int | None = None  # deprecated OpenAI name, still sent by older clients
    logprobs: bool | None = False
    top_logprobs: int | None = None
    add_generation_prompt: bool | None = True
    # OpenAI chat fields refused unless null or their no-op value.
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None

    _check_tools = _unsupported("tools")
    _check_tool_choice = _unsupported("tool_choice", ("none", "auto"))
    _check_functions = _unsupported("functions")
    _check_function_call = _unsupported("function_call", ("none", "auto"))
    _check_response_format = _unsupported("response_format", ({"type": "text"},))
    _check_modalities = _unsupported("modalities", (["text"],))
    _check_audio = _unsupported("audio")
    _check_prediction = _unsupported("prediction")
    _check_reasoning_effort = _unsupported("reasoning_effort")
    _check_web_search_options = _unsupported("web_search_options")


# -- responses ------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """Legacy completions logprobs: parallel lists per generated token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage


# A streamed completion choice carries the same fields as a whole one.
CompletionStreamChoice = CompletionChoice


class CompletionStreamResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionStreamChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    """A chat stream delta; unset fields are left out of the JSON (OpenAI sends ``role`` once)."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "hf-paged"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorInfo
