"""The LLM API on the real model: outputs, batching, seeds, stops, logprobs, streaming, errors."""

from __future__ import annotations

import numpy as np
import pytest

from jax_infer import SamplingParams
from jax_infer.model.step import paged_forward

pytestmark = pytest.mark.real_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


def test_generate_text_and_token_ids(smollm2):
    out = smollm2.generate("The capital of France is", GREEDY)[0]
    assert out.finish_reason in ("stop", "length")
    assert 1 <= len(out.token_ids) <= 12
    assert out.prompt == "The capital of France is"
    ids = [t for t in out.token_ids if t not in smollm2.tokenizer.eos_token_ids]
    assert out.text == smollm2.tokenizer.decode(ids)
    assert out.outputs[0] is out


def test_batch_equals_single_requests(smollm2):
    prompts = [
        "Hello, my name is",
        "1, 2, 3, 4,",
        "A long time ago in a galaxy far, far away there",
    ]
    batched = smollm2.generate(prompts, GREEDY)
    for p, b in zip(prompts, batched):
        single = smollm2.generate(p, GREEDY)[0]
        assert single.token_ids == b.token_ids


def test_token_id_prompts_equal_text_prompts(smollm2):
    text = "Water boils at"
    ids = smollm2.tokenizer.encode(text)
    a = smollm2.generate(text, GREEDY)[0]
    b = smollm2.generate([ids], GREEDY)[0]
    assert a.token_ids == b.token_ids and b.prompt_token_ids == ids


def test_seed_reproduces_and_is_batch_independent(smollm2):
    p = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, seed=1234)
    a = smollm2.generate("My favourite food is", p)[0]
    b = smollm2.generate(["Unrelated prompt here", "My favourite food is"], p)[1]
    assert a.token_ids == b.token_ids
    others = [
        smollm2.generate(
            "My favourite food is", SamplingParams(temperature=1.0, max_tokens=16, seed=s)
        )[0]
        for s in (1, 2)
    ]
    assert others[0].token_ids != others[1].token_ids


def test_stop_string_truncates(smollm2):
    prompt = "Count: one, two, three, four, five, six, seven,"
    full = smollm2.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24))[0]
    assert len(full.text) > 6
    stop = full.text[3:6]  # a substring that really occurs in the greedy output
    cut = smollm2.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[: full.text.index(stop)]
    kept = smollm2.generate(
        prompt,
        SamplingParams(
            temperature=0.0, max_tokens=24, stop=[stop], include_stop_str_in_output=True
        ),
    )[0]
    assert kept.text == full.text[: full.text.index(stop) + len(stop)]


def test_stop_token_ids_and_ignore_eos(smollm2):
    prompt = "The alphabet begins with A, B, C,"
    full = smollm2.generate(prompt, SamplingParams(temperature=0.0, max_tokens=16))[0]
    stop_id = full.token_ids[3]
    first = full.token_ids.index(stop_id)
    out = smollm2.generate(
        prompt, SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=[stop_id])
    )[0]
    assert out.token_ids == full.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id

    chat = [{"role": "user", "content": "Say hi."}]
    ended = smollm2.chat(chat, SamplingParams(temperature=0.0, max_tokens=64))[0]
    assert ended.finish_reason == "stop" and ended.token_ids[-1] in smollm2.tokenizer.eos_token_ids
    n = len(ended.token_ids) + 4
    forced = smollm2.chat(chat, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))[0]
    assert forced.finish_reason == "length" and len(forced.token_ids) == n


def test_logprobs(smollm2):
    out = smollm2.generate(
        "The sun rises in the", SamplingParams(temperature=0.0, max_tokens=5, logprobs=3)
    )[0]
    assert len(out.logprobs) == len(out.token_ids)
    for tok, entry in zip(out.token_ids, out.logprobs):
        assert tok in entry and 3 <= len(entry) <= 4
        assert entry[tok] == pytest.approx(max(entry.values()), abs=1e-5)  # greedy = argmax
        assert all(v <= 0 for v in entry.values())
    probs = np.exp(list(out.logprobs[0].values()))
    assert probs.sum() <= 1 + 1e-5


def test_streaming_deltas_add_up(smollm2):
    params = SamplingParams(temperature=0.0, max_tokens=20, stop=["\n\n"])
    chunks = list(smollm2.stream("Here is a short poem about rain:", params))
    final = chunks[-1]
    assert final.finished and all(not c.finished for c in chunks[:-1])
    assert "".join(c.delta_text for c in chunks) == final.text
    assert [c.delta_token_ids[0] for c in chunks] == final.token_ids
    assert final.text == smollm2.generate("Here is a short poem about rain:", params)[0].text


def test_bad_requests_are_clear(smollm2):
    with pytest.raises(ValueError, match="empty"):
        smollm2.generate("", GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        smollm2.generate([[1, 2, 10**6]], GREEDY)
    with pytest.raises(ValueError, match="max_model_len"):
        smollm2.generate("hi", SamplingParams(max_tokens=smollm2.max_model_len))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="sampling_params has 2 entries for 1 prompts"):
        smollm2.generate(["a"], [GREEDY, GREEDY])


def test_compilations_bounded(smollm2):
    """Shapes are bucketed: a second batch of new prompt lengths in the same range compiles no
    new step program."""
    rng = np.random.default_rng(0)

    def serve(lengths):
        prompts = [rng.integers(100, 1000, size=n).tolist() for n in lengths]
        smollm2.generate(prompts, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))

    serve([3, 17, 30, 5, 9, 22, 31, 2, 12])
    before = paged_forward._cache_size()
    serve([4, 18, 29, 7, 11, 25, 28, 6, 14])
    assert paged_forward._cache_size() == before


def test_orbax_checkpoint_of_llm_generates_the_same(smollm2, tmp_path):
    from jax_infer import LLM

    smollm2.save(str(tmp_path / "ckpt"))
    restored = LLM(model=str(tmp_path / "ckpt"), progress=False)
    assert restored.config == smollm2.config
    text = "x\n\n123 and  42 apples, 😀"
    assert restored.tokenizer.encode(text) == smollm2.tokenizer.encode(text)
    chat = [{"role": "user", "content": "hi"}]
    assert restored.tokenizer.apply_chat_template(chat) == smollm2.tokenizer.apply_chat_template(
        chat
    )
    assert restored.tokenizer.eos_token_ids == smollm2.tokenizer.eos_token_ids
    a = smollm2.generate("The moon is", GREEDY)[0]
    b = restored.generate("The moon is", GREEDY)[0]
    assert a.token_ids == b.token_ids
