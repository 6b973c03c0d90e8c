"""Streaming: the updates that queued up while a client lagged go out as one event per choice."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("fastapi")

from hf_paged.engine import GenerationOutput, RequestUpdate  # noqa: E402
from hf_paged.engine.outputs import SampleOutput  # noqa: E402
from hf_paged.server.config import ServerConfig  # noqa: E402
from hf_paged.server.serving import OpenAIServing, _Job, _TextChunks  # noqa: E402


class _NoClient:
    def abort(self, request_id: str) -> None:
        raise AssertionError(f"{request_id} should have finished, not been aborted")


def test_lagging_stream_coalesces_text_per_choice():
    serving = OpenAIServing(_NoClient(), tokenizer=None, config=ServerConfig(model_name="m"), vocab_size=10)
    words = [" a", " b", " c", " d"]
    samples = [SampleOutput(index=i, token_ids=[1, 2, 3, 4], text="".join(words), finish_reason="length")
               for i in range(2)]
    output = GenerationOutput("r-0", None, [1], samples=samples)

    async def run():
        queue: asyncio.Queue = asyncio.Queue()
        for step, word in enumerate(words):  # two samples, four steps, all queued before the client reads
            for index in range(2):
                last = step == len(words) - 1 and index == 1
                queue.put_nowait((0, RequestUpdate("r-0", index, [step + 1], text_delta=word,
                                                   finish_reason="length" if step == len(words) - 1 else None,
                                                   output=output if last else None)))
        job = _Job("cmpl-x", ["r-0"], 2, None, queue)
        outputs: list = []
        return [e async for e in serving._choice_events(job, outputs)], outputs

    events, outputs = asyncio.run(run())
    assert events == [(0, " a b c d", None), (1, " a b c d", None), (0, None, samples[0]), (1, None, samples[1])]
    assert outputs == [output]


def test_text_chunks_are_the_bytes_pydantic_writes():
    """The spliced JSON of a text delta equals the chunk model's own ``model_dump_json()``."""
    import random

    from hf_paged.server.protocol import (ChatCompletionChunk, ChatStreamChoice, CompletionStreamChoice,
                                          CompletionStreamResponse, DeltaMessage)

    def chat(i, t):
        return ChatCompletionChunk(id='chat-"x\\', created=7, model="m\u00e9", choices=[
            ChatStreamChoice(index=i, delta=DeltaMessage(content=t))])

    def completion(i, t):
        return CompletionStreamResponse(id="cmpl-1", created=7, model="m", choices=[CompletionStreamChoice(index=i, text=t)])

    rng = random.Random(0)
    alphabet = [chr(c) for c in range(0, 128)] + list("éß中文😀\u2028\u2029\ufffd\u00a0")
    for make in (chat, completion):
        render = _TextChunks(make)
        for _ in range(300):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 20)))
            index = rng.randrange(3)
            assert render(index, text) == make(index, text).model_dump_json(), repr(text)
