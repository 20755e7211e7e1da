"""What a request gives back: vLLM-shaped output objects, and the stop-string rules."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class RequestOutput:
    """One prompt's completion. While streaming, `delta_text`/`delta_token_ids` hold what is new
    since the previous chunk and the other fields are cumulative; `finished` marks the last."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "abort" or "error" once finished
    stop_reason: int | str | None = None  # the stop token id or stop string that matched
    logprobs: list[dict[int, float]] | None = None  # per token: {token id: logprob}
    finished: bool = False
    delta_text: str = ""
    delta_token_ids: list[int] = dataclasses.field(default_factory=list)
    error: str | None = None  # why the engine ended it, when finish_reason is "error"

    @property
    def outputs(self) -> list[RequestOutput]:
        """vLLM code reads `output.outputs[0].text`; one completion per prompt here."""
        return [self]


def find_stop_string(text: str, new_chars: int, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """Earliest stop string that ends within the last `new_chars` characters of `text`.

    Returns (index where it starts, the string) or None. Only the tail can hold a new match, so
    this costs O(new_chars + longest stop) per step, not O(len(text)).
    """
    if not stops:
        return None
    longest = max(len(s) for s in stops)
    tail_start = max(0, len(text) - new_chars - longest + 1)
    best = None
    for s in stops:
        i = text.find(s, tail_start)
        if i != -1 and (best is None or i < best[0]):
            best = (i, s)
    return best


def stop_holdback(stops: tuple[str, ...]) -> int:
    """Characters a stream must hold back: a stop string may be completed by the next token."""
    return max((len(s) for s in stops), default=1) - 1


@dataclasses.dataclass
class SequenceState:
    """Host-side output state of one request: tokens, text, stop rules, streaming cursor.

    Shared by every engine: an engine only calls `append` with each sampled token and `chunk`
    to report; what counts as a stop (eos, stop token ids, stop strings, max_tokens, the model's
    length limit) is decided here, once.
    """

    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: object  # SamplingParams
    seed: int
    detok: object  # tokenizer.IncrementalDetokenizer
    eos_ids: frozenset = frozenset()
    out_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    text: str = ""  # visible text (a matched stop string cut off)
    emitted: int = 0  # characters of `text` already streamed
    new_ids: list[int] = dataclasses.field(default_factory=list)  # since the last chunk

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int, logprob_entry: dict[int, float] | None, max_model_len: int):
        """Take one sampled token; sets finish_reason when a stop rule fires."""
        p = self.params
        self.out_ids.append(token)
        self.new_ids.append(token)
        if logprob_entry is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.append(logprob_entry)
        is_eos = token in self.eos_ids and not p.ignore_eos
        is_stop_token = token in p.stop_token_ids
        before = len(self.detok.text)
        # The eos / stop token itself is not part of the text (vLLM's default).
        if not (is_eos or is_stop_token) or not p.skip_special_tokens:
            self.detok.add(token)
        if is_eos or is_stop_token:
            self.finish("stop", token if is_stop_token else None)
            return
        full = self.detok.text
        hit = find_stop_string(full, len(full) - before, p.stop)
        if hit is not None:
            index, stop = hit
            self.text = full[: index + len(stop)] if p.include_stop_str_in_output else full[:index]
            self.finish_reason, self.stop_reason = "stop", stop
            return
        self.text = full
        if (
            len(self.out_ids) >= p.max_tokens
            or len(self.prompt_ids) + len(self.out_ids) >= max_model_len
        ):
            self.finish("length")

    def finish(self, reason: str, stop_reason: int | str | None = None, error: str | None = None):
        """End the sequence; a character cut off mid-way comes out as U+FFFD, so the text
        equals tokenizer.decode(token_ids)."""
        self.finish_reason, self.stop_reason, self.error = reason, stop_reason, error
        self.detok.flush()
        if reason != "stop" or isinstance(stop_reason, int) or stop_reason is None:
            self.text = self.detok.text

    def chunk(self) -> RequestOutput:
        """What is new since the last chunk, plus the cumulative state."""
        if self.finished:
            visible = len(self.text)
        else:
            visible = max(self.emitted, len(self.text) - stop_holdback(self.params.stop))
        delta = self.text[self.emitted : visible]
        self.emitted = visible
        new, self.new_ids = self.new_ids, []
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_ids,
            text=self.text,
            token_ids=list(self.out_ids),
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            logprobs=self.logprobs,
            finished=self.finished,
            delta_text=delta,
            delta_token_ids=new,
            error=self.error,
        )


def logprob_entry(token: int, n: int | None, row: int, rows) -> dict[int, float] | None:
    """{token id: logprob} for the sampled token plus the top n, from the sampler's arrays
    (logprob f32[R], top_ids i32[R, n], top_logprobs f32[R, n]) at `row`; None when not asked."""
    if n is None or rows is None:
        return None
    lp, top_ids, top_lps = rows
    entry = {int(t): float(v) for t, v in zip(top_ids[row, :n], top_lps[row, :n])}
    entry[token] = float(lp[row])
    return entry
