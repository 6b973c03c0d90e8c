"""`TextStream`: the streamed text of one sample, safe against split characters and stop strings."""

from __future__ import annotations

__all__ = ["TextStream"]


class TextStream:
    """Turns the output tokens of one sample into text deltas for streaming.

    Decodes the output tokens only (never the prompt): the deltas then add up to
    ``tokenizer.decode(output_ids)``, which is what the non-streaming response returns. Each step
    decodes a short window (the previous delta's tokens as context plus the new ones), and text
    ending in U+FFFD (an incomplete UTF-8 character of a byte-level tokenizer) is held back until
    the character completes. With stop strings, the last ``holdback`` characters are held back
    too, since they may turn out to begin a stop string that the final text is cut before.

    Args:
        tokenizer: a Transformers tokenizer.
        holdback: characters to keep unsent (the longest stop string's length minus one).
    """

    def __init__(self, tokenizer, holdback: int = 0) -> None:
        self._tokenizer = tokenizer
        self._holdback = max(0, holdback)
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # tokens already turned into text
        self.text = ""
        self.num_sent = 0  # characters of ``text`` handed out

    def add(self, token_ids: list[int]) -> str:
        """Append new tokens; returns the text that may be sent now (possibly empty)."""
        if token_ids:
            self._ids.extend(token_ids)
            decode = self._tokenizer.decode
            before = decode(self._ids[self._prefix : self._read], skip_special_tokens=True)
            after = decode(self._ids[self._prefix :], skip_special_tokens=True)
            if len(after) > len(before) and not after.endswith("\ufffd") and after.startswith(before):
                self.text += after[len(before) :]
                self._prefix, self._read = self._read, len(self._ids)
        end = len(self.text) - self._holdback
        if end <= self.num_sent:
            return ""
        delta = self.text[self.num_sent : end]
        self.num_sent = end
        return delta

    def finish(self, final_text: str) -> str:
        """The rest to send once the sample ended with ``final_text`` (its full, stop-cut text).

        Returns ``""`` when what was sent is not a prefix of ``final_text`` (a tokenizer whose
        windowed decode disagrees with the full one); sent text cannot be taken back.
        """
        sent = self.text[: self.num_sent]
        if not final_text.startswith(sent):
            return ""
        self.num_sent = len(final_text)
        return final_text[len(sent) :]
