"""What a request gives back: vLLM-shaped output objects, made from the request record
(`make_output`; the stop rules that fill it are `scheduler.request.commit_tokens`)."""

from __future__ import annotations

import dataclasses

import numpy as np

from jax_infer.scheduler.request import Request, stop_holdback


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
    first_scheduled_time: float | None = None  # time.monotonic() of its first step
    # Parallel sampling (SamplingParams.n): which sample this is, the id the request was added
    # under (request_id is then the sample's own, `child_request_ids`), and, on the one
    # output per prompt that LLM.generate returns for n > 1, all n samples in order (its
    # other fields are then sample 0's).
    index: int = 0
    group_id: str | None = None
    samples: list[RequestOutput] | None = None
    # SamplingParams.prompt_logprobs: per prompt token {token id: logprob}, the first None.
    prompt_logprobs: list[dict[int, float] | None] | None = None

    @property
    def outputs(self) -> list[RequestOutput]:
        """vLLM code reads `output.outputs[i].text`: the n samples (one when n=1)."""
        return self.samples if self.samples is not None else [self]


def child_request_ids(request_id: str, n: int) -> list[str]:
    """The engine request ids of the n samples of `request_id`: itself when n=1, else
    f"{request_id}#{i}"."""
    return [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]


def make_output(req: Request) -> RequestOutput:
    """What is new since the last output of `req`, plus the cumulative state; advances the
    streaming cursor."""
    stops = req.sampling_params.stop if req.sampling_params is not None else ()
    if req.is_finished:
        visible = len(req.text)
    else:
        visible = max(req.num_emitted_chars, len(req.text) - stop_holdback(stops))
    delta = req.text[req.num_emitted_chars : visible]
    req.num_emitted_chars = visible
    new = req.output_token_ids[req.num_emitted_tokens :]
    req.num_emitted_tokens = len(req.output_token_ids)
    return RequestOutput(
        request_id=req.request_id,
        prompt=req.prompt,
        prompt_token_ids=req.prompt_token_ids,
        text=req.text,
        token_ids=list(req.output_token_ids),
        finish_reason=req.finish_reason,
        stop_reason=req.stop_reason,
        logprobs=req.logprobs,
        finished=req.is_finished,
        delta_text=delta,
        delta_token_ids=new,
        error=req.error,
        first_scheduled_time=req.first_scheduled_time,
        index=req.sample_index,
        group_id=req.group_id,
        prompt_logprobs=list(req.prompt_logprobs) if req.prompt_logprobs is not None else None,
    )


def host_logprob_rows(res, num_logprobs: int):
    """The sampler's logprob arrays on the host, (logprob f32[R], top_ids i32[R, n],
    top_logprobs f32[R, n]) for `logprob_entry`, or None when no row asked for logprobs
    (SamplerFlags.num_logprobs < 0)."""
    if num_logprobs < 0:
        return None
    return np.asarray(res.logprob), np.asarray(res.top_ids), np.asarray(res.top_logprobs)


def logprob_entry(token: int, n: int | None, row: int, rows) -> dict[int, float] | None:
    """{token id: logprob} for the sampled token plus the top n, from the sampler's arrays
    (logprob f32[R], top_ids i32[R, n], top_logprobs f32[R, n]) at `row`; None when not asked."""
    if n is None or rows is None:
        return None
    lp, top_ids, top_lps = rows
    entry = {int(t): float(v) for t, v in zip(top_ids[row, :n], top_lps[row, :n])}
    entry[token] = float(lp[row])
    return entry
