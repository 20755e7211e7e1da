"""Pruning the real model (SmolLM2-135M): depth and width pruning calibrated on GPL-3 give
smaller checkpoints that load and generate through `LLM`, and stay a language model on
held-out text (Apache-2.0). Slow: calibration runs the full model over 1,024 tokens."""

from __future__ import annotations

import numpy as np
import pytest

from jax_infer import LLM, SamplingParams, weights
from jax_infer.eval import perplexity
from jax_infer.llm import load_tokenizer
from jax_infer.prune import calibration_tokens, layer_names, prune_layers, prune_width

pytestmark = [pytest.mark.slow, pytest.mark.real_model]


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def base(gguf_path):
    config, params, fmt, path, reader = weights.load(gguf_path, "float32", False)
    tokenizer = load_tokenizer(fmt, path, reader)
    ids = tokenizer.encode(read("/usr/share/common-licenses/GPL-3"), add_special_tokens=False)
    held_out = tokenizer.encode(
        read("/usr/share/common-licenses/Apache-2.0"), add_special_tokens=False
    )
    return config, params, tokenizer, calibration_tokens(ids, 256, 4), held_out[:512]


def test_smollm2_depth_and_width_pruned_checkpoint_generates(base, tmp_path):
    config, params, tokenizer, tokens, held_out = base
    pruned, c, info = prune_layers(params, config, tokens, 0.25, metric="bi", contiguous=False)
    pruned, c, _ = prune_width(pruned, c, tokens, mlp_fraction=0.25)
    assert (c.num_layers, c.intermediate_size) == (22, 1152) and len(info["removed_layers"]) == 8
    for name in layer_names(pruned):
        assert pruned[name]["w_gate"].shape == (576, 1152)
        assert pruned[name]["w_down"].shape == (1152, 576)
    weights.save_orbax(str(tmp_path / "ckpt"), pruned, c, tokenizer=tokenizer)
    llm = LLM(model=str(tmp_path / "ckpt"), num_pages=64, max_model_len=512, progress=False)
    assert llm.config == c
    out = llm.generate("The capital of France is", SamplingParams(temperature=0.0, max_tokens=8))
    assert len(out[0].token_ids) >= 1 and out[0].text.strip()

    # Pruned without healing it is worse than the original, but still far from chance.
    base_ppl = perplexity(params, config, held_out, window=512, stride=512).perplexity
    ppl = perplexity(llm.params, c, held_out, window=512, stride=512).perplexity
    assert base_ppl < ppl < 1000 < c.vocab_size, (base_ppl, ppl)
    assert np.isfinite(ppl)
