"""`IncrementalDetokenizer`: the text of one sample, token by token, with stop strings and hold-back."""

from __future__ import annotations

__all__ = ["IncrementalDetokenizer"]

# Prompt tokens decoded in front of the output: a tokenizer that drops the leading space of a decode
# (SentencePiece/Metaspace) then keeps the output's first space, as decode(prompt + output) does.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns the growing output of one sample into text, as ``decode(prompt + output)`` minus ``decode(prompt)``.

    Each `add` decodes a short window (the tokens of the previous delta as context plus the new
    ones), so the cost per token does not grow with the output. Text ending in U+FFFD (an
    incomplete UTF-8 character of a byte-level tokenizer) waits for the character to complete.
    With stop strings the text is cut before the first one found, and the last ``longest stop - 1``
    characters are held back from `take_delta` until they cannot begin one.

    Args:
        tokenizer: a Transformers tokenizer.
        prompt_token_ids: the prompt (only its last few tokens are used, as context).
        stop: strings that end the sample.

    Example:
        >>> detok = IncrementalDetokenizer(tok, prompt_ids, stop=["\\n"])  # doctest: +SKIP
        >>> detok.add([1234]); detok.take_delta()  # doctest: +SKIP
        ' Hello'
    """

    __slots__ = ("_decode", "_ids", "_prefix", "_read", "_stop", "_holdback", "text", "stop_index", "_sent")

    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str] | None = None) -> None:
        self._decode = tokenizer.decode
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0  # start of the decode window
        self._read = len(self._ids)  # tokens already turned into text
        self._stop = stop or []
        self._holdback = max(map(len, self._stop)) - 1 if self._stop else 0
        self.text = ""  # the sample's text so far (cut before a stop string once one is found)
        self.stop_index: int | None = None  # where the stop string began, once found
        self._sent = 0  # characters of ``text`` handed out by take_delta

    def add(self, token_ids: list[int]) -> bool:
        """Append output tokens; returns True when the text now contains a stop string."""
        if self.stop_index is not None:
            return True
        self._ids.extend(token_ids)
        delta = self._unread_text()
        if not delta or delta.endswith("\ufffd"):
            return False
        return self._append(delta)

    def _unread_text(self) -> str:
        """The text the tokens after ``_read`` add, decoded with the window before them as context."""
        window = self._ids[self._prefix :]
        before = self._decode(window[: self._read - self._prefix], skip_special_tokens=True)
        after = self._decode(window, skip_special_tokens=True)
        return after[len(before) :] if len(after) > len(before) else ""

    def _append(self, delta: str) -> bool:
        self._prefix, self._read = self._read, len(self._ids)
        searched_from = max(0, len(self.text) - self._holdback)
        self.text += delta
        if self._stop:
            found = [i for i in (self.text.find(s, searched_from) for s in self._stop) if i >= 0]
            if found:
                self.stop_index = min(found)
                self.text = self.text[: self.stop_index]
                return True
        return False

    def flush(self) -> None:
        """At the end of the sample: decode the tokens still held back as an incomplete character."""
        if self.stop_index is None and self._read < len(self._ids):
            self._append(self._unread_text())

    def take_delta(self, final: bool = False) -> str:
        """Text not handed out yet; unless ``final``, less what might still begin a stop string.

        ``final`` (the sample ended) first `flush`es.
        """
        if final:
            self.flush()
        end = len(self.text) if final or self.stop_index is not None else len(self.text) - self._holdback
        if end <= self._sent:
            return ""
        delta = self.text[self._sent : end]
        self._sent = end
        return delta
