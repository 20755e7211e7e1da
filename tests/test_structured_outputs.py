"""Structured outputs (llguidance): the packed-bitmask masking against llguidance's own numpy
reference, a property test that no masked token is ever sampled or verified, input checks,
and (SmolLM2, slow) every output of 22 JSON schemas and 6 regexes parsing and validating
(jsonschema, re.fullmatch): greedy and sampled, batched and single, with prompt-lookup
speculation and with an adversarial proposer, under preemption, with the prefix cache."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llguidance.numpy import apply_token_bitmask_inplace

from jax_infer import SamplingParams
from jax_infer.sampling import (
    SamplerFlags,
    SamplingMetadata,
    StructuredOutputsParams,
    apply_token_bitmask,
    sample,
)
from jax_infer.speculative.rejection import verify

SO = StructuredOutputsParams
V = 101  # not a multiple of 32: the last word's high bits are past the vocabulary
W = (V + 31) // 32
B = 4


def _pack(allowed: np.ndarray) -> np.ndarray:
    """bool[..., V] -> i32[..., W], written independently of the code under test."""
    padded = np.zeros(allowed.shape[:-1] + (W * 32,), bool)
    padded[..., :V] = allowed
    return np.packbits(padded, axis=-1, bitorder="little").view(np.int32)


def test_apply_token_bitmask_matches_llguidance_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(B, V)).astype(np.float32)
    allowed = rng.random((B, V)) < 0.3
    allowed[0] = True  # an all-ones row passes through unchanged
    bitmask = _pack(allowed)
    ref = logits.copy()
    apply_token_bitmask_inplace(ref, bitmask)
    got = np.asarray(jax.jit(apply_token_bitmask)(jnp.asarray(logits), jnp.asarray(bitmask)))
    np.testing.assert_array_equal(got, ref)
    assert np.isneginf(got[~allowed]).all() and (got[allowed] == logits[allowed]).all()


_row = st.fixed_dictionaries(
    {
        "temperature": st.sampled_from([0.0, 0.3, 1.0, 2.5]),
        "top_k": st.sampled_from([0, 1, 3, 40]),
        "top_p": st.sampled_from([1.0, 0.9, 0.3]),
        "min_p": st.sampled_from([0.0, 0.1]),
    }
)


def _mask_case(data, positions: int = 1):
    """Random logits and masks (each position allows >= 1 token; some allow exactly one, some
    forbid the argmax) and random sampling knobs per row."""
    seed = data.draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(B, positions, V)) * rng.choice([0.5, 3.0, 20.0])).astype(np.float32)
    density = data.draw(st.sampled_from([0.01, 0.2, 0.9]))
    allowed = rng.random((B, positions, V)) < density
    allowed[..., rng.integers(0, V)] = True
    if data.draw(st.booleans()):  # forbid each position's argmax: the top is masked away
        top = logits.argmax(-1)
        np.put_along_axis(allowed, top[..., None], False, axis=-1)
        allowed[..., (top + 1) % V] = True
    params = [SamplingParams(seed=int(rng.integers(0, 2**32)), **data.draw(_row)) for _ in range(B)]
    return logits, allowed, params


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_no_masked_token_is_ever_sampled(data):
    logits, allowed, params = _mask_case(data)
    logits, allowed = logits[:, 0], allowed[:, 0]
    meta = SamplingMetadata.build(params, [p.seed for p in params], [0] * B, B)
    out = sample(
        jnp.asarray(logits),
        meta,
        jnp.zeros((B, 1), jnp.int32),
        jnp.zeros((B, 1), bool),
        flags=SamplerFlags.for_batch(params),
        bitmask=jnp.asarray(_pack(allowed)),
    )
    tokens = np.asarray(out.token_ids)
    assert allowed[np.arange(B), tokens].all(), (tokens, params)
    for b, p in enumerate(params):
        if p.is_greedy:  # greedy: the best allowed token
            assert tokens[b] == np.where(allowed[b], logits[b], -np.inf).argmax()


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_no_masked_token_is_ever_verified(data):
    """Speculative verification with per-position masks: accepted drafts and the corrected or
    bonus token are allowed at their positions (drafts are cut to allowed prefixes first, as
    the engine does)."""
    k = 3
    logits, allowed, params = _mask_case(data, positions=k + 1)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    drafts = np.zeros((B, k), np.int32)
    num = np.zeros(B, np.int32)
    for b in range(B):
        n = int(rng.integers(0, k + 1))
        num[b] = n
        for j in range(n):
            drafts[b, j] = rng.choice(np.flatnonzero(allowed[b, j]))
    meta = SamplingMetadata.build(params, [p.seed for p in params], [0] * B, B)
    flags = SamplerFlags.for_batch(params)
    # verify() reads the last n + 1 of k + 1 logits per row: right-align them.
    aligned = np.stack([np.roll(logits[b], k - num[b], axis=0) for b in range(B)])
    tokens, counts = verify(
        jnp.asarray(aligned),
        jnp.arange(B, dtype=jnp.int32),
        meta,
        jnp.asarray(drafts),
        None,
        jnp.asarray(num),
        flags=flags,
        bitmask=jnp.asarray(_pack(allowed)),
    )
    tokens, counts = np.asarray(tokens), np.asarray(counts)
    for b in range(B):
        for j in range(int(counts[b])):
            assert allowed[b, j, tokens[b, j]], (b, j, tokens[b], counts[b], params[b])


def test_structured_outputs_params_checks():
    with pytest.raises(ValueError, match="exactly one of"):
        SO()
    with pytest.raises(ValueError, match="exactly one of"):
        SO(regex="a", choice=["a"])
    with pytest.raises(ValueError, match=r"StructuredOutputsParams.json is not valid JSON"):
        SO(json="{not json")
    with pytest.raises(ValueError, match=r"StructuredOutputsParams.json=.*is an object"):
        SO(json="[1, 2]")
    with pytest.raises(ValueError, match=r"StructuredOutputsParams.choice"):
        SO(choice="yes")
    with pytest.raises(ValueError, match=r"StructuredOutputsParams.regex"):
        SO(regex="")
    with pytest.raises(ValueError, match=r"SamplingParams.structured_outputs"):
        SamplingParams(structured_outputs={"regex": "a"})
    # Equal constraints hash equal (a dict schema is kept as its JSON text, key order kept).
    assert SO(json={"type": "integer"}) == SO(json='{"type": "integer"}')
    assert hash(SamplingParams(structured_outputs=SO(choice=["a", "b"]))) == hash(
        SamplingParams(structured_outputs=SO(choice=("a", "b")))
    )


# ---- SmolLM2 -------------------------------------------------------------------------


def _obj(props: dict, required=None) -> dict:
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
        "additionalProperties": False,
    }


_INT9 = {"type": "integer", "minimum": 0, "maximum": 9}
SCHEMAS = [
    ("a person", _obj({"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120}})),
    ("a color", _obj({"color": {"enum": ["red", "green", "blue"]}})),
    ("two to four digits", {"type": "array", "items": _INT9, "minItems": 2, "maxItems": 4}),
    ("a user record", _obj({"user": _obj({"id": {"type": "integer", "minimum": 1, "maximum": 999}, "active": {"type": "boolean"}})})),
    ("a temperature in Celsius", _obj({"celsius": {"type": "number", "minimum": -10, "maximum": 40}})),
    ("a product code", _obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}})),
    ("a book with an optional note", _obj({"title": {"type": "string", "maxLength": 10}, "note": {"type": "string", "maxLength": 8}}, required=["title"])),
    ("a status flag", _obj({"ok": {"type": "boolean"}, "version": {"const": "v1"}})),
    ("a list of points", {"type": "array", "items": _obj({"x": _INT9}), "minItems": 1, "maxItems": 3}),
    ("a number or a short word", {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 100}, {"type": "string", "maxLength": 5}]}),
    ("a level", _obj({"level": {"enum": [1, 2, 3]}})),
    ("an optional value", _obj({"value": {"type": ["integer", "null"], "minimum": 0, "maximum": 50}})),
    ("a short word", {"type": "string", "minLength": 2, "maxLength": 6}),
    ("a date", _obj({"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}})),
    ("a number between 10 and 20", {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 20}),
    ("a small boolean matrix", {"type": "array", "items": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 2}, "minItems": 1, "maxItems": 2}),
    ("a nested setting", _obj({"a": _obj({"b": _obj({"c": {"type": "integer", "minimum": 0, "maximum": 5}})})})),
    ("a line segment", {"$defs": {"pt": _obj({"x": _INT9, "y": _INT9})}, **_obj({"start": {"$ref": "#/$defs/pt"}, "end": {"$ref": "#/$defs/pt"}})}),
    ("a probability", {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.01}),
    ("a pet", {"enum": ["cat", "dog", "bird"]}),
    ("an email address", {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,6}\\.com$"}),
    ("a ticket", _obj({"status": {"enum": ["open", "closed"]}, "count": {"type": "integer", "minimum": 0, "maximum": 1000}, "labels": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2}})),
]  # fmt: skip
REGEXES = [
    ("a phone number", r"[0-9]{3}-[0-9]{4}"),
    ("yes or no", r"(yes|no)"),
    ("a capitalized name", r"[A-Z][a-z]{2,8}"),
    ("a time of day", r"\d{1,2}:\d{2} (AM|PM)"),
    ("a hex color", r"#[0-9a-f]{6}"),
    ("a version", r"v[0-9]\.[0-9]{1,2}\.[0-9]{1,2}"),
]
MAX_LEN = 512


def _cases(smollm2, temperature: float, max_tokens: int = 48):
    """(prompt ids, SamplingParams, check) for every schema and regex."""
    tok = smollm2.tokenizer
    out = []
    for i, (what, schema) in enumerate(SCHEMAS + REGEXES):
        is_regex = isinstance(schema, str)
        ask = (
            f"Write {what} matching the regular expression {schema}."
            if is_regex
            else f"Write {what} as JSON matching this schema: {json.dumps(schema)}"
        )
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": ask}], add_generation_prompt=True
        )
        so = SO(regex=schema) if is_regex else SO(json=schema)
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=0.95,
            seed=i,
            structured_outputs=so,
        )
        out.append((prompt, params, (is_regex, schema)))
    return out


def _check(output, check):
    is_regex, schema = check
    assert output.finish_reason == "stop", (output.text, output.finish_reason, output.error)
    if is_regex:
        assert re.fullmatch(schema, output.text), (schema, output.text)
    else:
        jsonschema.validate(json.loads(output.text), schema)


def _engine(smollm2, **kwargs):
    from jax_infer.engine import EngineConfig, LLMEngine

    ec = EngineConfig(**{"max_num_seqs": 32, "kv_cache_gb": 0.25, **kwargs})
    return LLMEngine(
        smollm2.config,
        smollm2.params,
        smollm2.tokenizer,
        dtype=smollm2.dtype,
        max_model_len=MAX_LEN,
        engine_config=ec,
    )


def _run(engine, cases):
    ids = [engine.add_request(p, sp) for p, sp, _ in cases]
    final = {}
    while engine.has_unfinished_requests():
        for chunk in engine.step():
            if chunk.finished:
                final[chunk.request_id] = chunk
    assert engine.scheduler.allocator.num_free() == engine.num_pages - 1
    return [final[i] for i in ids]


# The slow half: SmolLM2 on every schema and regex (one engine run each, all batched).


@pytest.fixture(scope="module")
def greedy_cases(smollm2):
    return _cases(smollm2, 0.0)


@pytest.fixture(scope="module")
def greedy_outputs(smollm2, greedy_cases):
    engine = _engine(smollm2)
    outs = _run(engine, greedy_cases)
    # The prompts share the chat template's head: the prefix cache served part of them.
    assert engine.stats()["prefix_cache_hits"] > 0
    return outs


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.real_model
@pytest.mark.slow
def test_every_output_validates_batched(smollm2, greedy_cases, greedy_outputs, temperature):
    if temperature == 0.0:
        cases, outs = greedy_cases, greedy_outputs
    else:
        cases = _cases(smollm2, temperature)
        outs = _run(_engine(smollm2), cases)
    for out, (_, _, check) in zip(outs, cases):
        _check(out, check)


@pytest.mark.real_model
@pytest.mark.slow
def test_single_requests_equal_batched(smollm2, greedy_cases, greedy_outputs):
    engine = _engine(smollm2, max_num_seqs=1)
    picks = [8, 17, 25]  # an array of objects, $ref, a time regex
    for i in picks:
        (out,) = _run(engine, [greedy_cases[i]])
        _check(out, greedy_cases[i][2])
        assert out.token_ids == greedy_outputs[i].token_ids, i


@pytest.mark.real_model
@pytest.mark.slow
def test_preemption_keeps_the_grammar_in_step(smollm2, greedy_cases, greedy_outputs):
    """A pool too small for the batch: requests are preempted mid-output and recomputed; the
    matcher keeps the committed tokens, so the outputs equal the unpreempted ones."""
    picks = list(range(0, len(greedy_cases), 3))
    engine = _engine(smollm2)
    ids = [engine.add_request(p, sp) for p, sp, _ in (greedy_cases[i] for i in picks)]
    final, preempted = {}, []
    while engine.has_unfinished_requests():
        mid_output = [r for r in engine.requests.values() if 0 < r.num_output_tokens]
        if not preempted and len(mid_output) >= len(picks) // 2:
            # Every running request loses its pages mid-output and recomputes them.
            preempted = engine.scheduler.preempt_all()
        for chunk in engine.step():
            if chunk.finished:
                final[chunk.request_id] = chunk
    assert preempted, "the run was meant to preempt requests mid-output"
    for i, rid in zip(picks, ids):
        _check(final[rid], greedy_cases[i][2])
        assert final[rid].token_ids == greedy_outputs[i].token_ids, i


class _AdversarialProposer:
    """Drafts that stress the matcher: a few tokens the grammar allows (random ones, so the
    target mostly rejects them: their masks are computed and rolled back), then a token it
    forbids (cut by the engine before verification)."""

    gated = False

    def __init__(self, engine, seed=0):
        self.engine = engine
        self.rng = np.random.default_rng(seed)

    def propose(self, rows, pool):
        from jax_infer.speculative.proposers import Draft

        drafts = []
        for row in rows:
            g = self.engine.requests[row.request_id].grammar
            m = g.matcher.deep_copy()
            toks = []
            for _ in range(self.rng.integers(0, row.num_drafts)):
                allowed = self._allowed(m)
                if m.is_stopped() or not allowed.any():
                    break
                toks.append(int(self.rng.choice(np.flatnonzero(allowed))))
                m.consume_token(toks[-1])
            # Then one token the grammar forbids here.
            toks.append(int(np.flatnonzero(~self._allowed(m))[0]))
            assert g.valid_prefix(toks) == len(toks) - 1
            drafts.append(Draft(toks))
        return drafts, pool

    def _allowed(self, matcher):
        bits = np.frombuffer(matcher.compute_bitmask(), np.uint8)
        return np.unpackbits(bits, bitorder="little")[: self.engine.config.vocab_size] == 1

    def verified(self, request_id, num_valid):
        pass

    def forget(self, request_id):
        pass


@pytest.mark.real_model
@pytest.mark.slow
def test_speculative_decoding(smollm2, greedy_cases, greedy_outputs):
    """Prompt lookup (the schema is in the prompt, so drafts match) on every case: greedy
    outputs token for token those of plain decoding; then an adversarial proposer on a third
    of them: still identical."""
    from jax_infer.speculative.decoder import SpeculativeDecoder

    engine = _engine(smollm2, speculative_method="ngram", num_speculative_tokens=4)
    outs = _run(engine, greedy_cases)
    stats = engine.stats()["speculative"]
    assert stats["num_accepted_tokens"] > 0, stats
    for i, (out, case) in enumerate(zip(outs, greedy_cases)):
        _check(out, case[2])
        assert out.token_ids == greedy_outputs[i].token_ids, i

    picks = list(range(1, len(greedy_cases), 3))
    engine = _engine(smollm2, speculative_method="ngram", num_speculative_tokens=4)
    engine.spec = SpeculativeDecoder(_AdversarialProposer(engine), 4)
    outs = _run(engine, [greedy_cases[i] for i in picks])
    assert engine.spec.stats.num_draft_tokens > 0
    for i, out in zip(picks, outs):
        _check(out, greedy_cases[i][2])
        assert out.token_ids == greedy_outputs[i].token_ids, i


@pytest.mark.real_model
@pytest.mark.slow
def test_sampled_with_speculation_validates(smollm2):
    cases = _cases(smollm2, 0.8)
    engine = _engine(smollm2, speculative_method="ngram", num_speculative_tokens=4)
    for out, (_, _, check) in zip(_run(engine, cases), cases):
        _check(out, check)
    assert engine.stats()["speculative"]["num_verify_rows"] > 0


@pytest.mark.real_model
def test_invalid_grammars_are_refused(smollm2):
    """An invalid schema, regex or grammar is a ValueError naming the field and the reason,
    from LLM.generate before anything runs, and from the engine's add_request."""
    bad = [
        (SO(json={"type": "objectx"}), r"structured_outputs\.json is invalid: .*objectx"),
        (SO(regex="ab("), r"structured_outputs\.regex is invalid: .*unclosed group"),
        (SO(grammar="start: foo"), r"structured_outputs\.grammar is invalid: .*foo"),
        (SO(json={"type": "string", "minLength": 5, "maxLength": 2}), r"structured_outputs\.json"),
    ]
    for so, message in bad:
        params = SamplingParams(max_tokens=4, structured_outputs=so)
        with pytest.raises(ValueError, match=message):
            smollm2.generate(["hi", "there"], params)
        with pytest.raises(ValueError, match=message):
            smollm2.engine.add_request("hi", params)
    assert not smollm2.engine.has_unfinished_requests()
    # Choice and Lark grammars end at their accepting state with "stop"; a grammar that can
    # go on forever ends at max_tokens with "length" (the text a valid prefix).
    outs = smollm2.generate(
        ["Is the sky blue?", "Say a word"],
        [
            SamplingParams(max_tokens=8, temperature=0, structured_outputs=SO(choice=["yes", "no"])),
            SamplingParams(max_tokens=6, temperature=0, structured_outputs=SO(grammar='start: "a" ("x" | "y")*')),
        ],
    )  # fmt: skip
    assert outs[0].text in ("yes", "no") and outs[0].finish_reason == "stop"
    assert re.fullmatch("a[xy]*", outs[1].text) and outs[1].finish_reason == "length"
