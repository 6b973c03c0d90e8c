"""Incremental detokenization: text deltas for streaming and stop-string detection."""

from __future__ import annotations

__all__ = ["IncrementalDetokenizer"]

# Prompt tokens decoded along with the first outputs, so that tokenizers which drop a leading
# space at the start of a decode (SentencePiece) still give the right first delta.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns a growing token list into text deltas, holding back incomplete UTF-8 characters.

    Decodes only a short window per step: the tokens since the last emitted delta plus the few
    before them for context.
    """

    def __init__(self, tokenizer, num_prompt_tokens: int) -> None:
        self.tokenizer = tokenizer
        self._prefix = max(0, num_prompt_tokens - _CONTEXT_TOKENS)
        self._read = num_prompt_tokens
        self.text = ""

    def step(self, token_ids: list[int]) -> str:
        """The new text after ``token_ids`` grew (possibly empty while a character is incomplete)."""
        decode = self.tokenizer.decode
        before = decode(token_ids[self._prefix : self._read], skip_special_tokens=True)
        after = decode(token_ids[self._prefix :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        delta = after[len(before) :]
        self._prefix, self._read = self._read, len(token_ids)
        self.text += delta
        return delta

    def find_stop(self, stops: list[str], delta_len: int) -> int | None:
        """Start of the earliest stop string that ends in the last ``delta_len`` characters."""
        if not delta_len:
            return None
        longest = max(len(s) for s in stops)
        lo = max(0, len(self.text) - delta_len - longest + 1)
        found = [i for i in (self.text.find(s, lo) for s in stops) if i >= 0]
        return min(found) if found else None
