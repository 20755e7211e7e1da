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
    finish_reason: str | None = None  # "stop" or "length" once finished
    stop_reason: int | str | None = None  # the stop token id or stop string that matched
    logprobs: list[dict[int, float]] | None = None  # per token: {token id: logprob}
    finished: bool = False
    delta_text: str = ""
    delta_token_ids: list[int] = dataclasses.field(default_factory=list)

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
