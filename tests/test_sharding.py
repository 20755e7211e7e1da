"""Sharded logits, decode, placement and loading on 8 simulated CPU devices.

Why a subprocess. The device count of the CPU backend is fixed when jax first initializes
it (`jax.config.update("jax_num_cpu_devices", 8)` must come before), and in one
`python -m pytest` run other test files initialize jax long before this one. So the
multi-device checks run in a fresh interpreter: this same file, run as
`python -m tests.test_sharding MODE DIR`, sets the device count first, measures
(errors, specs read back from `.sharding.spec`, shard shapes, bytes read), and writes a JSON
report to DIR/MODE.json; the pytest tests below assert on it. The pure rule tests need no devices
and run in-process (tests/test_sharding_rules.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_infer import sharding
from jax_infer.config import ModelConfig
from jax_infer.weights.names import expected_shapes
from tests.test_sharding_rules import QTensor

NUM_DEVICES = 8
ROOT = Path(__file__).resolve().parent.parent
MESHES = [(1, 2), (1, 4), (2, 1), (2, 2)]
DECODE_MESH = (2, 2)
DECODE_CASES = ("llama", "heads_9_3")  # kv heads split; attention replicated

# Sharding cases: (tiny_models case, overrides). Vocabularies of 128 split over model <= 4,
# mistral keeps 97 so its embedding and head fall back to replication; heads_9_3 has
# SmolLM2's head counts, which divide neither model=2 nor model=4.
TINY = {
    "llama": ("llama", {"vocab_size": 128}),  # N=4, K=2: kv replicated at model=4
    "qwen2_bias": ("qwen2_bias", {"vocab_size": 128}),  # K=1: kv replicated at model>1; tied
    "mistral_sliding": ("mistral_sliding", {}),
    # Gemma 3: QK-norm [H] and post norms [D] replicated; tied embedding split by vocabulary.
    "gemma3": ("gemma3", {"vocab_size": 128}),
    "heads_9_3": (
        "llama",
        {
            "vocab_size": 128,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "hidden_size": 72,
            "intermediate_size": 96,
        },
    ),
}
READS_CASE = "llama@1x4"  # the load whose host reads are recorded


def mesh_name(case: str, data: int, model: int) -> str:
    return f"{case}@{data}x{model}"


# == worker: runs in a subprocess with 8 CPU devices =====================================


def greedy(params, config, cache, prompts, steps, forward):
    """Prefill ragged prompts, then `steps` - 1 decode steps; (tokens per row, prefill logits)."""
    b = len(prompts)
    lens = [len(p) for p in prompts]
    max_len = cache[0][0].shape[1]
    tokens = np.zeros((b, max(lens)), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    kw = dict(config=config, dtype=jnp.float32, attn_len=max_len)
    logits, cache = forward(
        params, tokens, jnp.zeros(b, jnp.int32), jnp.asarray(lens, jnp.int32), cache, **kw
    )
    first = np.asarray(logits)
    out = [[int(t)] for t in first.argmax(-1)]
    pos = np.asarray(lens, np.int32)
    for _ in range(steps - 1):
        step = np.array([[row[-1]] for row in out], np.int32)
        logits, cache = forward(params, step, pos, jnp.ones(b, jnp.int32), cache, **kw)
        for row, t in zip(out, np.asarray(logits).argmax(-1)):
            row.append(int(t))
        pos = pos + 1
    return out, first, cache


def spec_list(array) -> list:
    spec = tuple(array.sharding.spec)
    spec += (None,) * (array.ndim - len(spec))
    return [list(s) if isinstance(s, tuple) else s for s in spec]


class RecordingFile:
    """safe_open stand-in that logs the shape of every block read from the file."""

    def __init__(self, handle, log: dict):
        self.handle, self.log = handle, log

    def __enter__(self):
        self.f = self.handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)

    def keys(self):
        return self.f.keys()

    def get_tensor(self, name):
        self.log.setdefault(name, []).append("whole")
        return self.f.get_tensor(name)

    def get_slice(self, name):
        return RecordingSlice(self.f.get_slice(name), name, self.log)


class RecordingSlice:
    def __init__(self, inner, name: str, log: dict):
        self.inner, self.name, self.log = inner, name, log

    def get_shape(self):
        return self.inner.get_shape()

    def __getitem__(self, index):
        block = self.inner[index]
        self.log.setdefault(self.name, []).append(list(block.shape))
        return block


@contextlib.contextmanager
def recording_reads(hf_module):
    """Route the HF loader's safe_open through RecordingFile; yields the read log."""
    log: dict = {}
    real_open = hf_module.safe_open

    def recording_open(*args, **kwargs):
        return RecordingFile(real_open(*args, **kwargs), log)

    hf_module.safe_open = recording_open
    try:
        yield log
    finally:
        hf_module.safe_open = real_open


def check_builder_tags() -> dict:
    """ParamsBuilder with a mesh against without, for in-memory sources with every transform
    tag (GGUF's path): llama at model=4 splits wq (row-permuted "T_q") and replicates wk."""
    from jax_infer.weights.common import ParamsBuilder
    from jax_infer.weights.names import GGUF_NAMES, expand

    config = ModelConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=112,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        attention_bias=True,
    )
    shapes = expected_shapes(config)
    rng = np.random.default_rng(4)
    plain = ParamsBuilder(config, jnp.float32, "plain", progress=False)
    split = ParamsBuilder(config, jnp.float32, "split", False, mesh=sharding.make_mesh(1, 4))
    tags = set()
    for src, (path, tag) in expand(GGUF_NAMES, config.num_layers).items():
        shape = shapes[path][::-1] if tag.startswith("T") else shapes[path]
        source = rng.standard_normal(shape).astype(np.float32)
        plain.put(path, source, tag, src)
        split.put(path, source, tag, src)
        tags.add(tag)
    want, got = plain.finish(), split.finish()

    def max_diff(a, b):
        return float(np.abs(np.asarray(a) - np.asarray(b)).max())

    errs = jax.tree.map(max_diff, want, got)
    return {
        "tags": sorted(tags),
        "max_err": max(jax.tree.leaves(errs)),
        "wq_spec": spec_list(got["layers_0"]["wq"]),
        "bq_spec": spec_list(got["layers_0"]["bq"]),
    }


def worker_tiny(tmp: Path) -> dict:
    from jax_infer.model.cache import init_cache, init_sharded_cache
    from jax_infer.model.step import forward
    from jax_infer.weights import hf, load_hf

    report: dict = {"devices": jax.device_count(), "cases": {}, "decode": {}}
    rng = np.random.default_rng(0)
    for case in TINY:
        config, ref_params = load_hf(str(tmp / case), progress=False)
        tokens = rng.integers(0, config.vocab_size, size=(2, 12)).astype(np.int32)
        args = (tokens, jnp.zeros(2, jnp.int32), jnp.full(2, 12, jnp.int32))
        kw = dict(config=config, dtype=jnp.float32, attn_len=16, all_logits=True)
        ref, _ = forward(ref_params, *args, init_cache(config, 2, 16), **kw)
        ref = np.asarray(ref)
        flat_ref = dict(jax.tree_util.tree_flatten_with_path(ref_params)[0])
        for data, model in MESHES:
            name = mesh_name(case, data, model)
            mesh = sharding.make_mesh(data, model)
            with recording_reads(hf) as reads:
                _, params = load_hf(str(tmp / case), progress=False, mesh=mesh)
            arrays = {}
            param_err = 0.0
            for keypath, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
                arrays[sharding.path_str(keypath)] = {
                    "shape": list(leaf.shape),
                    "spec": spec_list(leaf),
                    "shards": [list(s.data.shape) for s in leaf.addressable_shards],
                    "devices": sorted(s.device.id for s in leaf.addressable_shards),
                }
                diff = np.abs(np.asarray(leaf) - np.asarray(flat_ref[keypath])).max()
                param_err = max(param_err, float(diff))
            cache = init_sharded_cache(config, 2, 16, mesh)
            logits, new_cache = forward(params, *args, cache, **kw)
            entry = {
                "logits_err": float(np.abs(np.asarray(logits) - ref).max()),
                "param_err": param_err,
                "arrays": arrays,
                "cache_spec": spec_list(cache[0][0]),
                "cache_out_spec": spec_list(new_cache[0][0]),
                "mesh_devices": [d.id for d in mesh.devices.flat],
            }
            if name == READS_CASE:
                entry["reads"] = reads
            report["cases"][name] = entry
            if (data, model) == DECODE_MESH and case in DECODE_CASES:
                prompts = [tokens[0, :5].tolist(), tokens[1, :11].tolist()]
                want, _, _ = greedy(
                    ref_params, config, init_cache(config, 2, 32), prompts, 8, forward
                )
                cache = init_sharded_cache(config, 2, 32, mesh)
                got, _, cache = greedy(params, config, cache, prompts, 8, forward)
                report["decode"][name] = {
                    "want": want,
                    "got": got,
                    "cache_spec": spec_list(cache[0][0]),
                }
    report["builder"] = check_builder_tags()
    mesh = sharding.make_mesh(1, 2)
    config = ModelConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=112,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
    )
    quant = {"wq": QTensor(np.ones((64, 64), np.int8), np.ones((64,), np.float32))}
    placed = sharding.shard_params({"layers_0": quant}, config, mesh)["layers_0"]["wq"]
    report["quant"] = {
        "values": spec_list(placed.values),
        "scales": spec_list(placed.scales),
        "scale_shards": [list(s.data.shape) for s in placed.scales.addressable_shards],
    }
    return report


def worker_smollm2(tmp: Path) -> dict:
    from jax_infer import weights
    from jax_infer.llm import load_tokenizer
    from jax_infer.model.cache import init_cache, init_sharded_cache
    from jax_infer.model.step import forward

    config, params, fmt, path, reader = weights.load("smollm2-135m", progress=False)
    mesh = sharding.make_mesh(1, 2)
    sharded = sharding.shard_params(params, config, mesh)
    prompt = [load_tokenizer(fmt, path, reader).encode("The capital of France is")]
    want, ref, _ = greedy(params, config, init_cache(config, 1, 32), prompt, 8, forward)
    cache = init_sharded_cache(config, 1, 32, mesh)
    got, logits, cache = greedy(sharded, config, cache, prompt, 8, forward)
    layer = sharded["layers_0"]
    return {
        "devices": jax.device_count(),
        "rel_err": float(np.abs(logits - ref).max() / np.abs(ref).max()),
        "want": want,
        "got": got,
        "specs": {k: spec_list(layer[k]) for k in ("wq", "wk", "wo", "w_gate", "w_down")}
        | {"embed": spec_list(sharded["embed"])},
        "cache_spec": spec_list(cache[0][0]),
    }


WORKERS = {"tiny": worker_tiny, "smollm2": worker_smollm2}


def run_worker(mode: str, tmp: Path, timeout: float) -> dict:
    out = tmp / f"{mode}.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_sharding", mode, str(tmp)],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"sharding worker {mode!r} failed (rc={proc.returncode}):\n{proc.stderr[-6000:]}"
        )
    report = json.loads(out.read_text())
    assert report["devices"] == NUM_DEVICES
    return report


# == multi-device tests (assert on the worker's report) ==================================


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory) -> dict:
    # HF models are built here, where torch is already imported, so the worker needs only jax.
    from tests.tiny_models import make_hf_model

    tmp = tmp_path_factory.mktemp("sharding")
    for case, (base, overrides) in TINY.items():
        make_hf_model(base, tmp / case, **overrides)
    return run_worker("tiny", tmp, timeout=300)


ALL = [(case, data, model) for case in TINY for data, model in MESHES]


@pytest.mark.parametrize("case, data, model", ALL)
def test_sharded_logits_equal_unsharded(tiny_report, case, data, model):
    entry = tiny_report["cases"][mesh_name(case, data, model)]
    assert entry["param_err"] == 0.0, "sharded load changed parameter values"
    assert entry["logits_err"] <= 1e-5, f"max abs logit error {entry['logits_err']}"


def expected_specs(case: str, data: int, model: int) -> dict:
    """The layout restated from the rules: heads split only when the head count divides
    `model`, channels and vocabulary when their size does, size-1 mesh axes never named."""
    from tests.tiny_models import CASES, COMMON

    base, overrides = TINY[case]
    c = COMMON | CASES[base][1] | overrides
    n, k = c["num_attention_heads"], c["num_key_value_heads"]

    def split(count: int) -> str | None:
        return "model" if model > 1 and count % model == 0 else None

    q, kv, v, f = split(n), split(k), split(c["vocab_size"]), split(c["intermediate_size"])
    return {
        "embed": [v, None],
        "lm_head": [None, v],
        "final_norm": [None],
        "attn_norm": [None],
        "mlp_norm": [None],
        "post_attn_norm": [None],
        "post_mlp_norm": [None],
        "q_norm": [None],
        "k_norm": [None],
        "wq": [None, q],
        "wk": [None, kv],
        "wv": [None, kv],
        "wo": [q, None],
        "bq": [q],
        "bk": [kv],
        "bv": [kv],
        "w_gate": [None, f],
        "w_up": [None, f],
        "w_down": [f, None],
        "cache": ["data" if data > 1 else None, None, kv, None],
    }


@pytest.mark.parametrize("case, data, model", ALL)
def test_placement_matches_rules(tiny_report, case, data, model):
    entry = tiny_report["cases"][mesh_name(case, data, model)]
    want = expected_specs(case, data, model)
    for path, info in entry["arrays"].items():
        assert info["spec"] == want[path.split("/")[-1]], path
    assert entry["cache_spec"] == want["cache"]
    assert entry["cache_out_spec"] == want["cache"], "the step changed the cache's sharding"


@pytest.mark.parametrize("case, data, model", ALL)
def test_each_device_holds_only_its_slice(tiny_report, case, data, model):
    entry = tiny_report["cases"][mesh_name(case, data, model)]
    sizes = {"data": data, "model": model}
    split_any = False
    for path, info in entry["arrays"].items():
        local = [
            n // (sizes[axis] if axis is not None else 1)
            for n, axis in zip(info["shape"], info["spec"])
        ]
        assert info["devices"] == sorted(entry["mesh_devices"]), path
        assert info["shards"] == [local] * (data * model), path
        split_any |= local != info["shape"]
    assert split_any == (model > 1), "model parallelism must split some parameter"


def test_sharded_load_reads_only_slices(tiny_report):
    """llama at model=4: split tensors are read block by block, never whole; replicated ones
    (k/v: 2 heads over 4) are read once, not once per device."""
    reads = tiny_report["cases"][READS_CASE]["reads"]
    assert all("whole" not in blocks for blocks in reads.values())
    assert reads["model.layers.0.mlp.gate_proj.weight"] == [[28, 64]] * 4  # [F, D] by rows
    assert reads["model.layers.0.mlp.down_proj.weight"] == [[64, 28]] * 4  # [D, F] by cols
    assert reads["model.embed_tokens.weight"] == [[32, 64]] * 4
    assert reads["model.layers.0.self_attn.k_proj.weight"] == [[32, 64]]


@pytest.mark.parametrize("case", DECODE_CASES)
def test_greedy_decode_with_sharded_cache(tiny_report, case):
    data, model = DECODE_MESH
    entry = tiny_report["decode"][mesh_name(case, data, model)]
    assert entry["got"] == entry["want"]
    assert entry["cache_spec"] == expected_specs(case, data, model)["cache"]


def test_sharded_builder_applies_every_transform(tiny_report):
    builder = tiny_report["builder"]
    assert builder["tags"] == ["T", "T_k", "T_q", "copy", "unperm_k", "unperm_q"]
    assert builder["max_err"] == 0.0
    assert builder["wq_spec"] == [None, "model"] and builder["bq_spec"] == ["model"]


def test_quantized_stand_in_shards_like_its_weight(tiny_report):
    quant = tiny_report["quant"]
    assert quant["values"] == [None, "model"]
    assert quant["scales"] == ["model"]
    assert quant["scale_shards"] == [[32], [32]]


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_model_parallel(tmp_path, gguf_path):
    report = run_worker("smollm2", tmp_path, timeout=400)
    assert report["rel_err"] <= 1e-5, f"relative error of last-position logits {report['rel_err']}"
    assert report["got"] == report["want"]
    specs = report["specs"]
    # 9 q / 3 kv heads do not split in 2: attention replicated; MLP and vocabulary split.
    assert specs["wq"] == specs["wk"] == specs["wo"] == [None, None]
    assert specs["w_gate"] == [None, "model"] and specs["w_down"] == ["model", None]
    assert specs["embed"] == ["model", None]
    assert report["cache_spec"] == [None, None, None, None]


if __name__ == "__main__":
    # Before anything initializes the backend: this interpreter exists to get 8 devices.
    jax.config.update("jax_num_cpu_devices", NUM_DEVICES)
    mode, directory = sys.argv[1], Path(sys.argv[2])
    result = WORKERS[mode](directory)
    (directory / f"{mode}.json").write_text(json.dumps(result))
