"""Cold start: the persistent compilation cache, its counters, and precompiling every step
bucket (jax_infer/compile_cache.py, jax_infer/precompile.py).

The slow test is the issue's claim: a second engine in a new process, over the same cache
directory, compiles no new program (every one a cache hit), and serving after a precompile
compiles nothing. Speed itself is scripts/benchmark_cold_start.py's.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_infer import compile_cache, program_store
from jax_infer.attention.metadata import build_metadata, step_shape
from jax_infer.engine import EngineConfig
from jax_infer.precompile import step_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = os.path.join(ROOT, "tests", "cold_start_child.py")


# -- where the cache lives ----------------------------------------------------------------


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.default_cache_dir() == str(tmp_path / "xdg" / "jax_infer" / "xla")
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "env"))
    assert compile_cache.resolve_cache_dir("auto") == str(tmp_path / "env")
    assert compile_cache.resolve_cache_dir(str(tmp_path / "mine")) == str(tmp_path / "mine")
    for off in (None, "off", "OFF", "none", ""):
        assert compile_cache.resolve_cache_dir(off) is None
    monkeypatch.setenv(compile_cache.ENV_VAR, "off")
    assert compile_cache.resolve_cache_dir("auto") is None


def test_bad_cache_options_name_the_parameter():
    with pytest.raises(ValueError, match=r"compilation_cache_dir=5 is invalid: allowed are"):
        EngineConfig(compilation_cache_dir=5)
    with pytest.raises(ValueError, match=r"EngineConfig.precompile='yes' must be a bool"):
        EngineConfig(precompile="yes")


def test_counters_count_compiles_writes_and_hits(tmp_path):
    """A new program is compiled and written; after jax forgets it (clear_caches), the same
    program is a persistent-cache hit, not a compile."""
    try:
        assert compile_cache.enable(str(tmp_path)) == str(tmp_path)
        f = jax.jit(lambda x: jnp.cos(x) * 3.25 + 17.0)  # a program no other test compiles
        x = jnp.arange(11.0)
        before = compile_cache.stats()
        expected = np.asarray(f(x))
        mid = compile_cache.stats()
        assert mid["programs"] - before["programs"] == 1
        assert mid["compiled"] - before["compiled"] == 1
        assert mid["cache_writes"] - before["cache_writes"] == 1
        assert any(files for _, _, files in os.walk(tmp_path))
        jax.clear_caches()
        np.testing.assert_array_equal(np.asarray(f(x)), expected)
        after = compile_cache.stats()
        assert after["programs"] - mid["programs"] == 1
        assert after["cache_hits"] - mid["cache_hits"] == 1
        assert after["compiled"] == mid["compiled"]
        assert after["cache_dir"] == str(tmp_path)
    finally:
        compile_cache.enable("auto")  # back to the session's directory


# -- which shapes precompile covers ---------------------------------------------------------


@pytest.mark.parametrize(
    "max_num_seqs, budget, page_size, max_model_len",
    [(32, 512, 16, 4096), (4, 64, 8, 96), (6, 48, 16, 100), (2, 16, 16, 20)],
)
def test_step_shapes_cover_every_scheduled_step(max_num_seqs, budget, page_size, max_model_len):
    """Random steps the scheduler may form (decode rows at any kv length, at most one prompt
    chunk within the token budget and max_model_len), laid out by build_metadata: each one's
    shape is among `step_shapes`, and every listed shape is one build_metadata can make."""
    listed = step_shapes(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        page_size=page_size,
        max_model_len=max_model_len,
    )
    shapes = {s for s, *_ in listed}
    assert len(shapes) == len(listed)
    rng = np.random.default_rng(0)
    seen = set()
    # Small spaces get more draws: the random steps must reach every listed shape, and 2x
    # decode-row buckets make shapes such as "3 short rows + a chunk" rare (~1 in 1,000).
    for _ in range(3000 if max_model_len > 100 else 15000):
        d = int(rng.integers(0, max_num_seqs + 1))
        chunk = rng.random() < 0.5 and d < max_num_seqs and budget - d >= 2
        if d == 0 and not chunk:
            continue
        starts = [int(rng.integers(0, max_model_len)) for _ in range(d)]
        q_lens = [1] * d
        if chunk:
            q = int(rng.integers(2, min(budget - d, max_model_len) + 1))
            starts.append(int(rng.integers(0, max_model_len - q + 1)))
            q_lens.append(q)
        tables = [[0] * -(-(s + q) // page_size) for s, q in zip(starts, q_lens)]
        meta, _, _ = build_metadata(starts, q_lens, tables, page_size, max_decode_rows=max_num_seqs)
        shape = step_shape(meta)
        assert shape in shapes, (d, q_lens[-1], max(s + q for s, q in zip(starts, q_lens)))
        seen.add(shape)
    if max_model_len <= 100:  # small spaces: the random steps reach every listed shape
        assert seen == shapes


# -- a second process compiles nothing --------------------------------------------------------


def _child(cache_dir, *args, env=None) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", **(env or {})}
    proc = subprocess.run(
        [sys.executable, CHILD, str(cache_dir), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_second_process_compiles_no_new_program(tmp_path):
    cache = tmp_path / "xla"
    first = _child(cache)
    pre, end = first["precompile"], first["end"]
    assert pre["cache_dir"] == str(cache)
    assert first["shapes"] >= 8
    assert pre["compiled"] > 0 and pre["cache_hits"] == 0
    # Every compiled program written: to jax's cache, or (the steps) to the program store
    # (on a background thread: counted by the end, after the child's flush).
    assert end["cache_writes"] + end["stored_writes"] == end["compiled"]
    assert end["stored_writes"] >= first["shapes"]
    # Serving after the precompile needed no program the precompile had not made.
    assert end["programs"] == pre["programs"]

    second = _child(cache)
    s_pre, s_end = second["precompile"], second["end"]
    assert s_end["programs"] == end["programs"]
    assert s_end["cache_hits"] == s_end["programs"]  # every program from the cache
    assert s_end["stored_programs"] >= first["shapes"]  # the steps not even traced
    assert s_end["compiled"] == 0 and s_end["cache_writes"] == 0
    assert s_pre["compile_seconds"] < pre["compile_seconds"]
    assert second["tokens"] == first["tokens"]

    # Without the precompile (only the null page was touched by it): the same tokens, and
    # the programs this workload needs are all in the cache too.
    lazy = _child(cache, "--no-precompile")
    assert lazy["tokens"] == first["tokens"]
    assert lazy["end"]["compiled"] == 0 and lazy["end"]["cache_hits"] > 0
    assert lazy["end"]["stored_programs"] > 0

    # Stored step programs (program_store.py) switched off: every step traced again (the
    # XLA cache still answers its compile), and the same tokens as the stored programs gave.
    assert any(f.endswith(program_store.SUFFIX) for f in os.listdir(cache / "programs"))
    traced = _child(cache, "--no-precompile", env={program_store.SWITCH_ENV: "0"})
    assert traced["end"]["stored_programs"] == 0 and traced["end"]["stored_writes"] == 0
    assert traced["tokens"] == first["tokens"]


# -- stored step programs (program_store.py) ------------------------------------------------


def test_stored_function_keys_loads_and_recovers(tmp_path, caplog):
    """In one process: a new StoredFunction (empty memory) loads the stored program, bitwise
    the same result; another static argument or shape is another entry; a corrupted entry
    is recompiled with a warning."""

    @functools.partial(jax.jit, static_argnames="scale")
    def f(x, *, scale):
        return jnp.sin(x) * scale + 0.125

    try:
        compile_cache.enable(str(tmp_path))
        directory = program_store.store_dir()
        x = jnp.arange(13.0)
        want = np.asarray(program_store.StoredFunction(f, "f")(x, scale=3.0))
        program_store.flush()
        (entry,) = os.listdir(directory)
        before = compile_cache.stats()
        got = program_store.StoredFunction(f, "f")(x, scale=3.0)
        assert compile_cache.stats()["stored_programs"] == before["stored_programs"] + 1
        np.testing.assert_array_equal(np.asarray(got), want)
        program_store.StoredFunction(f, "f")(x, scale=2.0)
        program_store.StoredFunction(f, "f")(jnp.arange(7.0), scale=3.0)
        program_store.flush()
        assert len(os.listdir(directory)) == 3
        path = os.path.join(directory, entry)
        data = bytearray(open(path, "rb").read())
        data[len(data) // 2] ^= 0xFF
        open(path, "wb").write(bytes(data))
        got = program_store.StoredFunction(f, "f")(x, scale=3.0)
        np.testing.assert_array_equal(np.asarray(got), want)
        assert "does not load" in caplog.text
        program_store.flush()
    finally:
        compile_cache.enable("auto")
