"""`OpenAIServing`: turns completion and chat requests into engine submissions and their results into responses."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from ..engine import AsyncEngine, EngineDeadError, GenerationOutput, QueueFullError, RequestUpdate, SamplingParams
from ..engine.client import SHUTTING_DOWN
from ..engine.input_processor import render_chat
from ..engine.outputs import SampleOutput
from .config import ServerConfig
from .errors import APIError, error_body
from .logprobs import LogprobFormatter
from .protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    ChatStreamChoice,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChoice,
    CompletionStreamResponse,
    DeltaMessage,
    Usage,
)

__all__ = ["OpenAIServing"]

logger = logging.getLogger(__name__)

# How often a non-streaming request waiting for its result checks that its client is still there.
_DISCONNECT_POLL_S = 1.0

# What a 429 asks the client to wait, in seconds: about the time a waiting request needs to start.
_RETRY_AFTER_S = "1"

# SamplingParams field names as the API calls them (for the ``param`` of a 400).
_API_PARAM = {"max_new_tokens": "max_tokens", "stop": "stop", "logprobs": "logprobs"}


@dataclass
class _Job:
    """The engine requests of one HTTP request and the queue their events arrive on."""

    base_id: str
    request_ids: list[str]
    n: int
    logprobs: int | None
    queue: asyncio.Queue


class OpenAIServing:
    """Handlers of ``/v1/completions`` and ``/v1/chat/completions``.

    Args:
        client: the engine's client, where requests go.
        tokenizer: tokenizes prompts, renders chat templates, decodes logprob tokens.
        config: server settings (model name, max length, chat template...).
        vocab_size: prompt token ids must lie in ``[0, vocab_size)``.
    """

    def __init__(self, client: AsyncEngine, tokenizer, config: ServerConfig, vocab_size: int) -> None:
        self._client = client
        self._tokenizer = tokenizer
        self._config = config
        self._vocab_size = vocab_size
        self._logprobs = LogprobFormatter(tokenizer)

    # -- completions ------------------------------------------------------------------------------

    async def completions(self, req: CompletionRequest, raw: Request) -> Response:
        """``POST /v1/completions``."""
        self._check_model(req.model)
        if req.echo:
            raise APIError(400, "echo is not supported", param="echo")
        prompts = self._completion_prompts(req.prompt)
        logprobs = req.logprobs
        if logprobs is not None and not 0 <= logprobs <= self._config.max_logprobs:
            raise APIError(400, f"logprobs must be in [0, {self._config.max_logprobs}], got {logprobs}",
                           param="logprobs")
        max_tokens = req.max_tokens if req.max_tokens is not None else 16
        self._check_lengths(prompts, max_tokens, "max_tokens", "prompt")
        params = self._sampling_params(req, max_tokens, "max_tokens", logprobs)
        job, created, outputs = await self._run(raw, req, "cmpl", prompts, params, self._completion_chunks)
        if not isinstance(outputs, list):
            return outputs
        choices = [
            CompletionChoice(
                index=i * job.n + s.index,
                text=s.text or "",
                logprobs=self._logprobs.completion(s) if logprobs is not None else None,
                finish_reason=s.finish_reason,
            )
            for i, out in enumerate(outputs)
            for s in out.samples
        ]
        choices.sort(key=lambda c: c.index)
        body = CompletionResponse(id=job.base_id, created=created, model=self._config.model_name, choices=choices,
                                  usage=_usage(outputs))
        return JSONResponse(body.model_dump())

    def _completion_prompts(self, prompt) -> list[list[int]]:
        """Token ids of each prompt of ``prompt`` (text, texts, ids, lists of ids)."""
        if isinstance(prompt, str):
            texts: list[str] | None = [prompt]
            id_lists: list[list[int]] = []
        elif not prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        elif all(isinstance(p, str) for p in prompt):
            texts = list(prompt)
        elif all(isinstance(p, int) for p in prompt):
            texts, id_lists = None, [list(prompt)]
        else:
            texts, id_lists = None, [list(p) for p in prompt]
        if texts is not None:
            id_lists = [self._encode(t) for t in texts]
        for ids in id_lists:
            if not ids:
                raise APIError(400, "prompt is empty", param="prompt")
            bad = [t for t in ids if not 0 <= t < self._vocab_size]
            if bad:
                raise APIError(400, f"prompt token ids outside the vocabulary [0, {self._vocab_size}): {bad[:5]}",
                               param="prompt")
        return id_lists

    def _encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not text:
            return []
        return list(self._tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    async def _completion_chunks(self, job: _Job, created: int, include_usage: bool
                                 ) -> AsyncIterator[BaseModel | str]:
        name = self._config.model_name

        def chunk(choice: CompletionStreamChoice) -> CompletionStreamResponse:
            return CompletionStreamResponse(id=job.base_id, created=created, model=name, choices=[choice])

        text_chunk = _TextChunks(lambda index, text: chunk(CompletionStreamChoice(index=index, text=text)))
        outputs: list[GenerationOutput] = []
        async with aclosing(self._choice_events(job, outputs)) as events:  # closing it aborts what still runs
            async for index, text, sample in events:
                if sample is None:
                    yield text_chunk(index, text)
                    continue
                yield chunk(CompletionStreamChoice(
                    index=index, text="", finish_reason=sample.finish_reason,
                    logprobs=self._logprobs.completion(sample) if self._wants_logprobs(job) else None,
                ))
        if include_usage:
            yield CompletionStreamResponse(id=job.base_id, created=created, model=name, choices=[],
                                           usage=_usage(outputs))

    # -- chat -------------------------------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Response:
        """``POST /v1/chat/completions``."""
        self._check_model(req.model)
        prompt = self._render_chat(req)
        top = req.top_logprobs
        if top is not None:
            if not req.logprobs:
                raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
            if not 0 <= top <= self._config.max_logprobs:
                raise APIError(400, f"top_logprobs must be in [0, {self._config.max_logprobs}], got {top}",
                               param="top_logprobs")
        logprobs = (top or 0) if req.logprobs else None
        field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:
            # OpenAI's default for chat: as long as the context allows.
            max_tokens = self._config.max_model_len - len(prompt)
            if max_tokens <= 0:
                raise APIError(400, f"the messages take {len(prompt)} tokens, the model's maximum context length "
                               f"is {self._config.max_model_len}", param="messages")
        self._check_lengths([prompt], max_tokens, field, "messages")
        params = self._sampling_params(req, max_tokens, field, logprobs)
        job, created, outputs = await self._run(raw, req, "chatcmpl", [prompt], params, self._chat_chunks)
        if not isinstance(outputs, list):
            return outputs
        choices = [
            ChatChoice(
                index=s.index,
                message=ChatResponseMessage(content=s.text or ""),
                logprobs=self._logprobs.chat(s) if logprobs is not None else None,
                finish_reason=s.finish_reason,
            )
            for s in outputs[0].samples
        ]
        body = ChatCompletionResponse(id=job.base_id, created=created, model=self._config.model_name,
                                      choices=choices, usage=_usage(outputs))
        return JSONResponse(body.model_dump())

    def _render_chat(self, req: ChatCompletionRequest) -> list[int]:
        """Token ids of ``messages`` through the chat template (``--chat-template`` or the tokenizer's)."""
        template = self._config.chat_template
        if template is None and not getattr(self._tokenizer, "chat_template", None):
            raise APIError(400, "the model's tokenizer has no chat template; use /v1/completions or start the "
                           "server with --chat-template FILE", param="messages", code="no_chat_template")
        messages = []
        for m in req.messages:
            message = {"role": m.role, "content": m.text()}
            if m.name is not None:
                message["name"] = m.name
            messages.append(message)
        try:
            return render_chat(self._tokenizer, messages, chat_template=template,
                               add_generation_prompt=req.add_generation_prompt)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e

    async def _chat_chunks(self, job: _Job, created: int, include_usage: bool) -> AsyncIterator[BaseModel | str]:
        name = self._config.model_name

        def chunk(choice: ChatStreamChoice) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=job.base_id, created=created, model=name, choices=[choice])

        text_chunk = _TextChunks(lambda index, text: chunk(ChatStreamChoice(index=index,
                                                                             delta=DeltaMessage(content=text))))
        for index in range(job.n):
            yield chunk(ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant", content="")))
        outputs: list[GenerationOutput] = []
        async with aclosing(self._choice_events(job, outputs)) as events:  # closing it aborts what still runs
            async for index, text, sample in events:
                if sample is None:
                    yield text_chunk(index, text)
                    continue
                yield chunk(ChatStreamChoice(
                    index=index, delta=DeltaMessage(content=None), finish_reason=sample.finish_reason,
                    logprobs=self._logprobs.chat(sample) if self._wants_logprobs(job) else None,
                ))
        if include_usage:
            yield ChatCompletionChunk(id=job.base_id, created=created, model=name, choices=[], usage=_usage(outputs))

    # -- shared -----------------------------------------------------------------------------------

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self._config.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self._config.model_name!r}",
                           param="model", code="model_not_found")

    def _check_lengths(self, prompts: list[list[int]], max_tokens: int, field: str, prompt_field: str) -> None:
        if max_tokens <= 0:
            raise APIError(400, f"{field} must be at least 1, got {max_tokens}", param=field)
        limit = self._config.max_model_len
        for ids in prompts:
            if len(ids) >= limit:
                raise APIError(400, f"the prompt has {len(ids)} tokens; the model's maximum context length is "
                               f"{limit}", param=prompt_field)
            if len(ids) + max_tokens > limit:
                raise APIError(400, f"the model's maximum context length is {limit} tokens, but {len(ids)} prompt "
                               f"tokens plus {field}={max_tokens} make {len(ids) + max_tokens}", param=field)

    def _sampling_params(self, req, max_tokens: int, max_field: str, logprobs: int | None) -> SamplingParams:
        stop = [req.stop] if isinstance(req.stop, str) else req.stop
        n = _or(req.n, 1)
        if n > self._config.max_n:
            raise APIError(400, f"n must be at most {self._config.max_n} on this server, got {n}", param="n")
        top_k = req.top_k if req.top_k is not None else 0
        try:
            return SamplingParams(
                max_new_tokens=max_tokens,
                temperature=_or(req.temperature, 1.0),
                top_p=_or(req.top_p, 1.0),
                top_k=0 if top_k == -1 else top_k,  # -1 means "off" in vLLM's API
                min_p=_or(req.min_p, 0.0),
                repetition_penalty=_or(req.repetition_penalty, 1.0),
                presence_penalty=_or(req.presence_penalty, 0.0),
                frequency_penalty=_or(req.frequency_penalty, 0.0),
                seed=req.seed,
                stop=stop or None,
                ignore_eos=bool(req.ignore_eos),
                n=n,
                logprobs=logprobs,
            )
        except ValueError as e:
            name = str(e).split(" ", 1)[0]
            param = max_field if name == "max_new_tokens" else _API_PARAM.get(name, name)
            raise APIError(400, str(e).replace("max_new_tokens", max_field, 1), param=param) from e

    async def _run(self, raw: Request, req, prefix: str, prompts: list[list[int]], params: SamplingParams, chunks):
        """Submit a request; returns ``(job, created, outputs)`` where ``outputs`` is the finished list or,
        for a stream or a client that went away, the `Response` to send as it is."""
        job = self._submit(prefix, prompts, params, bool(req.stream))
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return job, created, self._sse(raw, job, chunks(job, created, include_usage))
        outputs = await self._collect(raw, job)
        return job, created, outputs if outputs is not None else Response(status_code=499)

    def _submit(self, prefix: str, prompts: list[list[int]], params: SamplingParams, stream: bool) -> _Job:
        """Submit one engine request per prompt (all or none: a refusal aborts those already in)."""
        base_id = f"{prefix}-{uuid.uuid4().hex}"
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        request_ids = [f"{base_id}-{i}" for i in range(len(prompts))]
        submitted: list[str] = []
        try:
            for i, (rid, ids) in enumerate(zip(request_ids, prompts)):
                submitted.append(self._client.submit(ids, params, _sink(loop, queue, i), request_id=rid,
                                                     stream_text=stream))
        except (QueueFullError, EngineDeadError) as e:
            for rid in submitted:
                self._client.abort(rid)
            if isinstance(e, QueueFullError):
                raise APIError(429, str(e), code="rate_limit_exceeded", headers={"Retry-After": _RETRY_AFTER_S}) from e
            raise APIError(503, f"the engine is not running: {e}") from e
        return _Job(base_id, request_ids, params.n, params.logprobs, queue)

    @staticmethod
    def _wants_logprobs(job: _Job) -> bool:
        return job.logprobs is not None

    async def _events(self, job: _Job) -> AsyncIterator[list[tuple[int, RequestUpdate]]]:
        """Updates of ``job``, in batches of all that arrived meanwhile, until all its requests are
        done; raises `APIError` for a failed one. Leaving early (client gone, error) aborts the
        requests still running."""
        done: set[int] = set()
        try:
            while len(done) < len(job.request_ids):
                batch = [await job.queue.get()]
                while not job.queue.empty():  # a stream that lags takes what queued up at once
                    batch.append(job.queue.get_nowait())
                for index, update in batch:
                    if update.output is not None:
                        done.add(index)
                        _raise_for_output(update.output)
                yield batch
        finally:
            for i, rid in enumerate(job.request_ids):
                if i not in done:
                    self._client.abort(rid)

    async def _choice_events(self, job: _Job, outputs: list[GenerationOutput]
                             ) -> AsyncIterator[tuple[int, str | None, SampleOutput | None]]:
        """A stream's events as ``(choice index, text, None)`` or, when a request ends,
        ``(choice index, None, finished sample)`` per sample; finished outputs go to ``outputs``.

        The text of updates that queued up while the client was slow comes as one event per choice.
        """
        async with aclosing(self._events(job)) as events:
            async for batch in events:
                texts: dict[int, str] = {}
                ended: list[tuple[int, SampleOutput]] = []
                for i, update in batch:
                    if update.text_delta:
                        choice = i * job.n + update.sample_index
                        texts[choice] = texts.get(choice, "") + update.text_delta
                    if update.output is not None:
                        outputs.append(update.output)
                        ended.extend((i * job.n + sample.index, sample) for sample in update.output.samples)
                for choice, text in texts.items():
                    yield choice, text, None
                for choice, sample in ended:
                    yield choice, None, sample

    async def _collect(self, raw: Request, job: _Job) -> list[GenerationOutput] | None:
        """Final outputs of ``job`` in prompt order, or ``None`` when the client went away (then aborted)."""
        outputs: dict[int, GenerationOutput] = {}
        next_check = time.monotonic() + _DISCONNECT_POLL_S
        try:
            while len(outputs) < len(job.request_ids):
                # The client is checked on a clock, not only when updates pause: a request that decodes
                # sends one per token, and one whose client left must not run to the end.
                if time.monotonic() >= next_check:
                    if await raw.is_disconnected():
                        return None
                    next_check = time.monotonic() + _DISCONNECT_POLL_S
                try:
                    # Waiting on the queue itself: cancelling a Queue.get on timeout loses no item.
                    index, update = await asyncio.wait_for(job.queue.get(), next_check - time.monotonic())
                except TimeoutError:
                    continue
                if update.output is not None:
                    outputs[index] = update.output
                    _raise_for_output(update.output)
        finally:
            for i, rid in enumerate(job.request_ids):
                if i not in outputs:
                    self._client.abort(rid)
        return [outputs[i] for i in range(len(job.request_ids))]

    def _sse(self, raw: Request, job: _Job, chunks: AsyncIterator[BaseModel | str]) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    yield f"data: {chunk if isinstance(chunk, str) else chunk.model_dump_json()}\n\n"
            except APIError as e:
                # Headers are sent already: report the error in-stream, as OpenAI does.
                yield f"data: {error_body(e.status, e.message, e.param, e.code).model_dump_json()}\n\n"
            finally:
                await chunks.aclose()  # aborts what is still running when the client left
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class _TextChunks:
    """The JSON of a stream's text-delta chunks (one per delta: the hot path of streaming) with no model
    built per delta: ``make(index, text)``'s ``model_dump_json()`` is rendered once per choice with a
    marker for the text, which each delta's JSON string then replaces (the same bytes: tests hold it)."""

    _MARK = f"hf-paged-text-{uuid.uuid4().hex}"

    __slots__ = ("_make", "_parts")

    def __init__(self, make: Callable[[int, str], BaseModel]) -> None:
        self._make = make
        self._parts: dict[int, tuple[str, str]] = {}

    def __call__(self, index: int, text: str) -> str:
        parts = self._parts.get(index)
        if parts is None:
            before, mark, after = self._make(index, self._MARK).model_dump_json().partition(f'"{self._MARK}"')
            parts = self._parts[index] = (before, after)
            assert mark, "the marker must appear in the chunk's JSON"
        return parts[0] + json.dumps(text, ensure_ascii=False) + parts[1]


def _sink(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int) -> Callable[[object], None]:
    def put(event: object) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (index, event))

    return put


def _raise_for_output(output: GenerationOutput) -> None:
    if output.error == SHUTTING_DOWN:
        raise APIError(503, SHUTTING_DOWN)
    if output.error is not None:
        raise APIError(500, f"generation failed: {output.error}")
    if not output.samples:  # aborted before any sample existed (server shutting down)
        raise APIError(503, "the request was aborted (server shutting down)")


def _usage(outputs: list[GenerationOutput]) -> Usage:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(s.token_ids) for o in outputs for s in o.samples)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _or(value, default):
    return default if value is None else value
