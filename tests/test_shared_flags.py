"""scripts/shared_flags.py: the flag groups every script shares, on FlagValues of our own."""

from __future__ import annotations

import dataclasses
import inspect

import jax
import pytest
import shared_flags
from absl import flags

from jax_infer import weights
from jax_infer.engine import EngineConfig
from jax_infer.llm import LLM


def all_flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    shared_flags.define_model_flags(fv)
    shared_flags.define_engine_flags(fv)
    shared_flags.define_mesh_flags(fv)
    shared_flags.define_json_flag(fv)
    return fv


def test_mesh_flags():
    fv = flags.FlagValues()
    shared_flags.define_mesh_flags(fv)
    fv(["prog"])
    assert shared_flags.mesh_from_flags(fv) is None  # 1x1: the unsharded path, unchanged
    fv(["prog", "--mesh_data=1", "--mesh_model=1"])
    assert (fv.mesh_data, fv.mesh_model) == (1, 1)
    fv(["prog", f"--mesh_model={len(jax.devices()) + 1}"])
    with pytest.raises(ValueError, match="needs"):
        shared_flags.mesh_from_flags(fv)


def test_engine_flag_defaults_are_engine_config_defaults():
    fv = all_flags()
    fv(["prog"])
    fields = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    for name in shared_flags.ENGINE_FLAGS:
        assert fv[name].default == fields[name], name
        assert fv[name].value == fields[name], name
    assert fv.model == weights.DEFAULT_MODEL
    assert fv.json is None


def test_llm_kwargs_from_parsed_flags():
    fv = all_flags()
    fv(
        [
            "prog",
            "--model=/tmp/ckpt",
            "--dtype=bfloat16",
            "--quantization=int8",
            "--max_num_seqs=4",
            "--max_num_partial_prefills=0",
            "--kv_cache_gb=0.25",
            "--noenable_prefix_caching",
            "--attention_backend=xla",
            "--kv_cache_dtype=int8",
            "--noasync_scheduling",
            "--precompile",
            "--compilation_cache_dir=off",
        ]
    )
    kwargs = shared_flags.llm_kwargs(fv)
    assert kwargs == {
        "model": "/tmp/ckpt",
        "dtype": "bfloat16",
        "quantization": "int8",
        "max_num_seqs": 4,
        "max_num_batched_tokens": EngineConfig.max_num_batched_tokens,
        "max_num_partial_prefills": None,  # 0 on the command line: as many as fit
        "page_size": EngineConfig.page_size,
        "kv_cache_gb": 0.25,
        "num_pages": None,
        "enable_prefix_caching": False,
        "attention_backend": "xla",
        "kv_cache_dtype": "int8",
        "async_scheduling": False,
        "precompile": True,
        "compilation_cache_dir": "off",
        "batch_invariant": False,
        "mesh": None,
    }
    # Every key is a keyword LLM takes.
    assert set(kwargs) <= set(inspect.signature(LLM).parameters)


def test_llm_kwargs_reads_only_defined_groups():
    fv = flags.FlagValues()
    shared_flags.define_model_flags(fv, dtype=False, quantization=False)
    shared_flags.define_engine_flags(fv, names=["attention_backend"])
    fv(["prog"])
    assert shared_flags.llm_kwargs(fv) == {
        "model": weights.DEFAULT_MODEL,
        "attention_backend": None,
    }
    fv = flags.FlagValues()
    shared_flags.define_model_flags(fv)
    fv(["prog", "--quantization=none"])
    assert shared_flags.llm_kwargs(fv)["quantization"] is None
    with pytest.raises(ValueError, match="not engine flags"):
        shared_flags.define_engine_flags(flags.FlagValues(), names=["page_sise"])


def test_llm_engine_defaults_are_engine_config_defaults():
    # LLM's signature reads them from EngineConfig, so flags, LLM and engine agree.
    params = inspect.signature(LLM).parameters
    for name, default in shared_flags.engine_defaults().items():
        assert params[name].default == default, name
