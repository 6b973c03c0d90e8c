"""Output processing: detokenization, stop strings, per-step updates and the finished outputs."""

from __future__ import annotations

import time

from .detokenizer import IncrementalDetokenizer
from .outputs import GenerationOutput, RequestUpdate, SampleOutput
from .sequence import Request, Sequence, SequenceStatus

__all__ = ["OutputProcessor"]


class OutputProcessor:
    """Turns the sequences a step advanced into `RequestUpdate`s, and finished requests into outputs.

    A sample is detokenized as it decodes (`IncrementalDetokenizer`) only when its request streams
    text or has stop strings; otherwise its text is decoded once, when it ends, by the same rule.
    Either way a sample's text is ``decode(prompt + output)`` minus ``decode(prompt)``, cut before
    a stop string, and the ``text_delta`` of its updates add up to that text.

    Args:
        tokenizer: decodes text (``None``: outputs carry token ids only).
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def find_stop_strings(self, seqs: list[Sequence]) -> list[Sequence]:
        """Detokenize the new token of each sample that needs it; returns those that hit a stop string."""
        if self.tokenizer is None:
            return []
        stopped = []
        for seq in seqs:  # only samples whose text streams or may stop decode as they go
            if seq.request.incremental_text and self._detokenizer(seq, incremental=True).add(seq.token_ids[-1:]):
                stopped.append(seq)
        return stopped

    def updates(self, seqs: list[Sequence]) -> list[RequestUpdate]:
        """One update per advanced sample; the last one of a request that ended carries its output."""
        updates = []
        last_of_finished: dict[str, tuple[RequestUpdate, Request]] = {}
        for seq in seqs:
            request = seq.request
            update = RequestUpdate(request.request_id, seq.sample_index, seq.token_ids[-1:])
            finished = seq.status is SequenceStatus.FINISHED
            if request.stream_text and seq.detokenizer is not None:
                update.text_delta = seq.detokenizer.take_delta(final=finished)
            if finished:
                update.finish_reason = seq.finish_reason.value
                if request.finished:
                    last_of_finished[request.request_id] = (update, request)
            updates.append(update)
        for update, request in last_of_finished.values():
            update.output = self.output(request)
        return updates

    def output(self, request: Request) -> GenerationOutput:
        """The `GenerationOutput` of a finished request (marks its finish time)."""
        request.finish_time = time.perf_counter()
        samples = []
        if request.error is None:
            for seq in sorted(request.sequences, key=lambda s: s.sample_index):
                samples.append(SampleOutput(
                    index=seq.sample_index,
                    token_ids=seq.output_token_ids,
                    text=self._text(seq),
                    finish_reason=seq.finish_reason.value if seq.finish_reason else None,
                    logprobs=seq.logprobs,
                ))
        ttft = request.first_token_time - request.arrival_time if request.first_token_time else None
        return GenerationOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            samples=samples,
            error=request.error,
            time_to_first_token=ttft,
            total_time=request.finish_time - request.arrival_time,
            num_cached_tokens=request.num_cached_tokens,
            prompt_logprobs=request.prompt_logprobs if request.error is None else None,
        )

    def _text(self, seq: Sequence) -> str | None:
        detok = self._detokenizer(seq, incremental=False)
        if detok is None:
            return None
        detok.flush()
        return detok.text

    def _detokenizer(self, seq: Sequence, *, incremental: bool) -> IncrementalDetokenizer | None:
        """``seq``'s detokenizer, created on first need (while decoding, ``incremental``, or at the end)."""
        if seq.detokenizer is None and self.tokenizer is not None and seq.request.detokenize:
            request = seq.request
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, request.params.stop)
            # Created late (at the end): catch up on the whole output; while decoding, `add` feeds the
            # first token right after.
            if not incremental:
                seq.detokenizer.add(seq.output_token_ids)
        return seq.detokenizer
