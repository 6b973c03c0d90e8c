"""`IncrementalDetokenizer`: the text of one sample, token by token, with stop strings and hold-back;
`ClientDetokenizer`: the same, applied by a client to the token-only updates of an engine process."""

from __future__ import annotations

__all__ = ["ClientDetokenizer", "IncrementalDetokenizer"]


def _fast_decoder(tokenizer):
    """``tokenizer.decode`` or, where it gives the same text, the Rust ``tokenizers`` backend's decode.

    Transformers' ``decode`` first walks the ids in Python (``to_py_obj``), which was the front end's
    largest single cost per streamed token; a fast tokenizer that neither overrides decoding nor
    cleans up spaces decodes exactly as its backend does.
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    backend = getattr(tokenizer, "backend_tokenizer", None)
    plain = (
        isinstance(tokenizer, PreTrainedTokenizerFast)
        and type(tokenizer).decode is PreTrainedTokenizerBase.decode
        and type(tokenizer)._decode is PreTrainedTokenizerFast._decode
        and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
    )
    return backend.decode if plain and backend is not None else tokenizer.decode


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
        self._decode = _fast_decoder(tokenizer)
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


class ClientDetokenizer:
    """The text of one request whose engine sent token ids only (``detokenize=False``), decoded by the client.

    Front-end detokenization: an engine in a process of its own (`EngineProcessClient`) spends no
    time on text; its client calls this on each of the request's updates, in order, and gets the
    ``text_delta``s (when ``stream_text``) and the final ``text`` of every sample that the engine
    would have produced (`IncrementalDetokenizer`, same rules). Requests with stop strings are
    decoded by the engine, which must stop at them.

    Example:
        >>> decode = ClientDetokenizer(tok, prompt_ids, stream_text=True)  # doctest: +SKIP
        >>> update = decode(update)  # doctest: +SKIP
    """

    __slots__ = ("_tokenizer", "_prompt", "_stream_text", "_samples")

    def __init__(self, tokenizer, prompt_token_ids: list[int], stream_text: bool) -> None:
        self._tokenizer = tokenizer
        self._prompt = prompt_token_ids
        self._stream_text = stream_text
        self._samples: dict[int, IncrementalDetokenizer] = {}

    def _sample(self, index: int) -> IncrementalDetokenizer:
        detok = self._samples.get(index)
        if detok is None:
            detok = self._samples[index] = IncrementalDetokenizer(self._tokenizer, self._prompt)
        return detok

    def __call__(self, update):
        """``update`` (a `RequestUpdate`) with its text filled in."""
        if update.output is not None and update.output.error is not None:
            return update  # an error carries no text
        detok = self._sample(update.sample_index)
        detok.add(update.new_token_ids)
        if self._stream_text and update.new_token_ids:  # as the engine: an abort's update has no delta
            update.text_delta = detok.take_delta(final=update.finish_reason is not None)
        if update.output is not None:
            for sample in update.output.samples:
                detok = self._samples.get(sample.index)
                if detok is None:  # a sample whose updates this client never saw
                    detok = self._sample(sample.index)
                    detok.add(sample.token_ids)
                detok.flush()
                sample.text = detok.text
        return update
