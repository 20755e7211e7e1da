"""The real model: SmolLM2-135M-Instruct from its GGUF, against HF transformers' own GGUF load."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jax_infer import SamplingParams
from jax_infer.model.cache import init_cache
from jax_infer.model.step import forward

pytestmark = pytest.mark.real_model

PLAIN = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a village by the sea,",
    "Photosynthesis is the process by which",
]
CHATS = [
    [{"role": "user", "content": "What is 12 times 7?"}],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
    [{"role": "user", "content": "Write a haiku about autumn leaves."}],
]


def hf_prompt_ids(tok, prompt):
    if isinstance(prompt, str):
        return tok(prompt)["input_ids"]
    ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("native", [False, True], ids=["jnp_attention", "cpu_kernel"])
@pytest.mark.parametrize("prompt", PLAIN[:2] + CHATS[:1], ids=["plain0", "plain1", "chat0"])
def test_last_position_logits_match_hf(smollm2, hf_smollm2, prompt, native):
    """Static-engine forward (contiguous cache) against HF, attending with the jnp `attend` or
    the C++ prefill kernel (`native_attention`, the static engine's default on this CPU)."""
    model, tok = hf_smollm2
    ids = hf_prompt_ids(tok, prompt)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0, -1].numpy()
    t = len(ids)
    logits, _ = forward(
        smollm2.params,
        jnp.asarray([ids + [0] * (64 - t)], jnp.int32),
        jnp.zeros(1, jnp.int32),
        jnp.full(1, t, jnp.int32),
        init_cache(smollm2.config, 1, 64),
        config=smollm2.config,
        dtype=jnp.float32,
        attn_len=64,
        native_attention=native,
    )
    ours = np.asarray(logits[0])
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel <= 1e-4, f"relative error of last-position logits {rel}"


@pytest.mark.slow
def test_greedy_32_tokens_identical_to_hf(smollm2, hf_smollm2):
    """7 prompts (plain and chat) in one batch through LLM.generate, each compared with HF's
    greedy generate token for token."""
    model, tok = hf_smollm2
    prompts = [hf_prompt_ids(tok, p) for p in PLAIN + CHATS]
    outs = smollm2.generate(prompts, SamplingParams(temperature=0.0, max_tokens=32))
    for ids, out in zip(prompts, outs):
        with torch.no_grad():
            ref = model.generate(
                torch.tensor([ids]), max_new_tokens=32, do_sample=False, top_p=None, top_k=None
            )[0, len(ids) :].tolist()
        assert out.token_ids == ref, tok.decode(ids)
