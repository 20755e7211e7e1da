"""Async scheduling for `LLMEngine` (`EngineConfig.async_scheduling`): step n+1 is scheduled,
laid out and dispatched before step n's tokens reach the host.

A step that may overlap (`_can_overlap`: one fused program whose sampling needs no output token
values) is dispatched with its decode inputs gathered on the device from the step in flight;
placeholders hold the sampled tokens' places in the scheduler until `_resolve` brings the
tokens to the host, applies the stop rules and detokenizes, while the next step computes.
"""

from __future__ import annotations

import dataclasses
import logging

from jax_infer.outputs import RequestOutput, make_output
from jax_infer.runner import PendingStep
from jax_infer.scheduler.request import PLACEHOLDER, finish, has_placeholder, resolve_placeholder

log = logging.getLogger("jax_infer.engine")


@dataclasses.dataclass
class _InFlight:
    """The step dispatched last and not yet resolved (async scheduling): the runner's pending
    step and, for each request it samples, its input row."""

    step: PendingStep
    rows: dict[str, int]


class AsyncSchedulingMixin:
    """The async half of `LLMEngine`: it reads the engine's `requests`, `scheduler`, `runner`,
    `async_scheduling`, `spec`, `fault_hook` and `_inflight`, and calls its `_step_batch`,
    `_fail_step` and `_pop`."""

    def _can_overlap(self, out) -> bool:
        """Whether this step may be dispatched before the previous one's tokens are on the
        host, and left in flight: one fused program (no logits back) whose sampling needs
        no output token values (no penalties: they count them; no grammar: its mask follows
        the last token; no forks, no prompt logprobs)."""
        # self.spec is checked here too, not only at construction: a decoder attached to a
        # built engine (tests, tools) must never see a step left in flight.
        if not self.async_scheduling or self.spec is not None:
            return False
        for s in out.scheduled:
            req = s.request
            p = req.sampling_params
            if (
                req.grammar is not None
                or s.followers
                or req.prompt_logprobs is not None
                or p.repetition_penalty != 1.0
                or p.presence_penalty != 0.0
                or p.frequency_penalty != 0.0
            ):
                return False
        return True

    def _step_async(self, out) -> list[RequestOutput]:
        """Dispatch `out` (its inputs from the step in flight where not yet known), then
        resolve the step in flight (fetch, stop rules, detokenization) while `out` computes,
        then advance the scheduler with placeholder tokens so the next step can be
        scheduled before `out`'s tokens are known."""
        prev = self._inflight
        try:
            if self.fault_hook is not None:
                self.fault_hook(self, out)
            if out.page_copies:
                self.runner.copy_pages(out.page_copies)
            batch = self._step_batch(out, {}, None, [])
            pending = self.runner.dispatch(
                batch, prev=None if prev is None else prev.step, gathers=self._gathers(out, prev)
            )
        except Exception as e:
            outputs = self._resolve()
            self._drop_finished_rows(out)
            return outputs + self._fail_step(out, e)
        if prev is not None:
            self.num_async_steps += 1
        outputs = self._resolve()
        sampling = [s.request_id for s in out.scheduled if s.sample]
        self.scheduler.update(out, dict.fromkeys(sampling, [PLACEHOLDER]))
        row_of = {s.request_id: i for i, s in enumerate(out.scheduled)}
        self._inflight = _InFlight(pending, {rid: row_of[rid] for rid in sampling})
        return outputs

    def _gathers(self, out, prev) -> list[tuple[int, int, int]]:
        """runner.dispatch's gathers: each input token of `out` that is a placeholder of
        `prev` (a decode's input; or inside a recompute chunk after a preemption)."""
        if prev is None:
            return []
        seq_row = prev.step.sequence_row()
        gathers = []
        for i, s in enumerate(out.scheduled):
            row = prev.rows.get(s.request_id)
            if row is None or not has_placeholder(s.request):
                continue
            pos = s.request.num_tokens - 1
            if s.start <= pos < s.end:
                gathers.append((i, pos - s.start, seq_row[row]))
        return gathers

    def _resolve(self) -> list[RequestOutput]:
        """Bring the step in flight's tokens to the host and commit them (stop rules,
        detokenization): an output for each of its requests. A request that a stop rule
        ends here has its row in the step now computing (if any) ignored."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return []
        try:
            result = inflight.step.result()
        except Exception as e:
            return self._fail_inflight(inflight, e)
        outputs = []
        for rid, i in inflight.rows.items():
            req = self.requests.get(rid)
            if req is None or not has_placeholder(req):
                continue
            resolve_placeholder(
                req,
                result.tokens[i],
                self.max_model_len,
                result.logprobs[i],
                self.engine_config.page_size,
            )
            if req.is_finished:
                self.scheduler.end(rid)  # no-op where the scheduler ended it already
                self._pop(rid)
            outputs.append(make_output(req))
        return outputs

    def _fail_inflight(self, inflight, exc: Exception) -> list[RequestOutput]:
        """The step in flight failed on the device: end its requests with "error"."""
        message = f"the engine step failed: {type(exc).__name__}: {exc}"
        log.error("an async step failed, ending requests %s: %s", list(inflight.rows), message)
        outputs = []
        for rid in inflight.rows:
            req = self._pop(rid)
            if req is None:
                continue
            if has_placeholder(req):
                req.output_token_ids.pop()
            req.error = message
            finish(req, "error")
            self.scheduler.end(rid)
            outputs.append(make_output(req))
        return outputs

    def _drop_finished_rows(self, out) -> bool:
        """Drop the rows of requests that ended since `out` was scheduled (resolved to a
        stop) and refresh the token ids of the others (placeholders resolved); False if no
        row is left. Call before running `out` synchronously."""
        kept = []
        for s in out.scheduled:
            if s.request.is_finished:
                continue
            s.token_ids = s.request.token_ids_slice(s.start, s.end)
            kept.append(s)
        out.num_decodes = sum(len(s.token_ids) == 1 for s in kept[: out.num_decodes])
        out.scheduled = kept
        return bool(kept)
