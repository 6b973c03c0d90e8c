"""`LogprobFormatter`: a sample's token logprobs in the OpenAI shapes of completions and chat."""

from __future__ import annotations

from ..engine.outputs import SampleOutput
from .protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

__all__ = ["LogprobFormatter"]


class LogprobFormatter:
    """Formats ``SampleOutput.logprobs`` (``(logprob, {token id: logprob})`` per token) for responses.

    Args:
        tokenizer: turns token ids into the token strings OpenAI reports.
    """

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    def completion(self, sample: SampleOutput) -> CompletionLogprobs:
        """``/v1/completions`` logprobs: tokens, their logprobs, top alternatives and text offsets."""
        result = CompletionLogprobs()
        offset = 0
        for token_id, (logprob, top) in zip(sample.token_ids, sample.logprobs or []):
            token = self._text(token_id)
            result.tokens.append(token)
            result.token_logprobs.append(logprob)
            result.top_logprobs.append({self._text(t): lp for t, lp in _by_logprob(top)} if top else None)
            result.text_offset.append(offset)
            offset += len(token)
        return result

    def chat(self, sample: SampleOutput) -> ChatLogprobs:
        """``/v1/chat/completions`` logprobs: per token its text, bytes, logprob and top alternatives."""
        content = []
        for token_id, (logprob, top) in zip(sample.token_ids, sample.logprobs or []):
            token = self._text(token_id)
            content.append(ChatTokenLogprob(
                token=token, logprob=logprob, bytes=list(token.encode("utf-8")),
                top_logprobs=[
                    TopLogprob(token=(t := self._text(i)), logprob=lp, bytes=list(t.encode("utf-8")))
                    for i, lp in _by_logprob(top or {})
                ],
            ))
        return ChatLogprobs(content=content)

    def _text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id])


def _by_logprob(top: dict[int, float]) -> list[tuple[int, float]]:
    return sorted(top.items(), key=lambda kv: -kv[1])
