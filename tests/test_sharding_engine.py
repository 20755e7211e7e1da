"""The engine and quantized params on a mesh of 8 simulated CPU devices.

Same scheme as tests/test_sharding.py (read its docstring): this file, run as
`python -m tests.test_sharding_engine MODE DIR`, sets the CPU device count before jax starts,
measures, and writes DIR/MODE.json; the tests below assert on that report.

- engine (fast): greedy outputs of `LLM.generate` (paged engine) on meshes 1x2, 1x4 (a tiny llama,
  N=4 / K=2: kv heads split at model=2, replicated at model=4) and 2x1, and of the static
  engine at 2x1, against the unsharded engine; the page pool's sharding read back before and
  after generating, and its old buffers deleted (the donation took). The int8 page pool's
  values and scales read back.
- quant (fast): int8 (per channel), int8-g32 and int4-g32 with the embedding, on 1x2 and 1x4: every
  stored array's placement against the rules restated here, and logits against unsharded,
  both with the native CPU kernels (which XLA runs unpartitioned) and with the XLA
  formulation (which it partitions, as on GPU/TPU).
- smollm2 (slow): the real model through `LLM(model="smollm2-135m", mesh=...)`, f32 on
  2x2, and int8 on 1x2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

NUM_DEVICES = 8
ROOT = Path(__file__).resolve().parent.parent
ENGINE_MESHES = [(1, 2), (1, 4), (2, 1)]
QUANT_MESHES = [(1, 2), (1, 4)]
SCHEMES = ("int8+embed", "int8-g32", "int4+embed")
# (formulation, scheme, mesh) whose logits are compared: each is a compile, so a subset.
LOGIT_CASES = [
    ("kernel", "int4+embed", (1, 2)),
    ("xla", "int8-g32", (1, 4)),
    ("xla", "int4+embed", (1, 2)),
]
# One real-model mesh that has both axes (each mesh is a model load and two compiles under
# CI's time budget); model 2 and 4 alone are covered by the tiny configs above.
SMOLLM2_MESHES = [(2, 2)]
TINY_VOCAB = 128
# Tiles of 64 columns: N=128 (wq, wo's input) has 2 tiles, N=64 (wk, wv) 1, F=256 4.
QUANT_CONFIG = dict(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    num_layers=1,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    tie_word_embeddings=True,
)


def mesh_name(data: int, model: int) -> str:
    return f"{data}x{model}"


def spec_list(array) -> list:
    spec = tuple(array.sharding.spec)
    spec += (None,) * (array.ndim - len(spec))
    return [list(s) if isinstance(s, tuple) else s for s in spec]


# == worker: runs in a subprocess with 8 CPU devices =====================================


def worker_engine(tmp: Path) -> dict:
    from jax_infer import LLM, SamplingParams, sharding
    from jax_infer.config import ModelConfig
    from jax_infer.model.cache import init_sharded_paged_cache

    rng = np.random.default_rng(0)
    # A one-token prompt (a decode row from the start) beside an 11-token prefill, then two
    # decode rows: two step shapes, so few compiles.
    prompts = [rng.integers(0, TINY_VOCAB, size=n).tolist() for n in (1, 11)]
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    kw = dict(progress=False, max_model_len=64, num_pages=32, max_num_seqs=4)

    def run(llm) -> list:
        return [o.token_ids for o in llm.generate(prompts, greedy)]

    path = str(tmp / "llama")
    report: dict = {"engine": {}}
    report["want"] = run(LLM(path, **kw))
    for data, model in ENGINE_MESHES:
        llm = LLM(path, mesh=(data, model), **kw)
        before = llm.engine.cache[0][0]
        got = run(llm)
        after = llm.engine.cache
        report["engine"][mesh_name(data, model)] = {
            "got": got,
            "pool_spec": spec_list(before),
            "pool_out_specs": sorted({str(spec_list(a)) for a in jax.tree.leaves(after)}),
            "pool_devices": len(before.sharding.device_set),
            "donated": before.is_deleted(),
            "wq": spec_list(llm.params["layers_0"]["wq"]),
            "wk": spec_list(llm.params["layers_0"]["wk"]),
        }
    report["static"] = run(LLM(path, engine="static", mesh=(2, 1), **kw))

    config = ModelConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=112,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
    )
    report["int8_pool"] = {}
    for data, model in ((1, 2), (2, 4)):
        mesh = sharding.make_mesh(data, model)
        pool = init_sharded_paged_cache(config, 8, 4, mesh, dtype=np.int8)[0][0]
        report["int8_pool"][mesh_name(data, model)] = {
            "values": spec_list(pool.values),
            "scales": spec_list(pool.scales),
            "scale_shards": [list(s.data.shape) for s in pool.scales.addressable_shards],
        }
    return report


def random_params(config, seed: int) -> dict:
    """Params of the config's shapes (flax's init runs op by op: seconds for nothing here)."""
    import jax.numpy as jnp

    from jax_infer.weights.common import unflatten
    from jax_infer.weights.names import expected_shapes

    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in expected_shapes(config).items():
        base = 1.0 if path.endswith("norm") else 0.0
        flat[path] = jnp.asarray(base + 0.1 * rng.standard_normal(shape), jnp.float32)
    return unflatten(flat)


def quant_logits(params, config, tokens, forward, init_cache) -> np.ndarray:
    import jax.numpy as jnp

    b, t = tokens.shape
    args = (tokens, jnp.zeros(b, jnp.int32), jnp.full(b, t, jnp.int32))
    kw = dict(config=config, dtype=jnp.float32, attn_len=t, all_logits=True)
    logits, _ = forward(params, *args, init_cache(), **kw)
    return np.asarray(logits)


def worker_quant(tmp: Path) -> dict:
    from jax_infer import sharding
    from jax_infer.config import ModelConfig
    from jax_infer.cpu import build
    from jax_infer.model.cache import init_cache, init_sharded_cache
    from jax_infer.model.step import forward
    from jax_infer.quant import quantize

    config = ModelConfig(**QUANT_CONFIG)
    params = random_params(config, seed=3)
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 8)).astype(np.int32)
    report: dict = {"kernels": build.features()}
    qparams = {scheme: quantize(params, scheme) for scheme in SCHEMES}
    report["placement"] = {}
    for scheme in SCHEMES:
        for data, model in QUANT_MESHES:
            placed = sharding.shard_params(qparams[scheme], config, sharding.make_mesh(data, model))
            arrays = {}
            for keypath, leaf in jax.tree_util.tree_flatten_with_path(placed)[0]:
                arrays[sharding.path_str(keypath)] = {
                    "shape": list(leaf.shape),
                    "spec": spec_list(leaf),
                    "shards": sorted({str(list(s.data.shape)) for s in leaf.addressable_shards}),
                }
            report["placement"][f"{scheme}@{mesh_name(data, model)}"] = arrays
    report["logits"] = {}
    for formulation in ("kernel", "xla"):
        if formulation == "xla":
            # The XLA formulation is chosen at trace time: drop the kernels and the traces.
            os.environ["JAX_INFER_CPU_KERNELS"] = "0"
            build.features.cache_clear()
            jax.clear_caches()
        refs: dict = {}
        for form, scheme, (data, model) in LOGIT_CASES:
            if form != formulation:
                continue
            if scheme not in refs:
                refs[scheme] = quant_logits(
                    qparams[scheme], config, tokens, forward, lambda: init_cache(config, 2, 8)
                )
            mesh = sharding.make_mesh(data, model)
            got = quant_logits(
                sharding.shard_params(qparams[scheme], config, mesh),
                config,
                tokens,
                forward,
                lambda mesh=mesh: init_sharded_cache(config, 2, 8, mesh),
            )
            ref = refs[scheme]
            err = float(np.abs(got - ref).max() / np.abs(ref).max())
            report["logits"][f"{formulation}/{scheme}@{mesh_name(data, model)}"] = err
    return report


def worker_smollm2(tmp: Path) -> dict:
    from jax_infer import LLM, SamplingParams

    prompts = ["The capital of France is", "def fibonacci(n):"]
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    kw = dict(progress=False, max_model_len=128, num_pages=32, max_num_seqs=4)

    def run(llm) -> list:
        return [o.token_ids for o in llm.generate(prompts, greedy)]

    report: dict = {"devices": jax.device_count(), "want": run(LLM("smollm2-135m", **kw))}
    for data, model in SMOLLM2_MESHES:
        llm = LLM("smollm2-135m", mesh=(data, model), **kw)
        report[mesh_name(data, model)] = {
            "got": run(llm),
            "w_up": spec_list(llm.params["layers_0"]["w_up"]),
            "pool": spec_list(llm.engine.cache[0][0]),
        }
    # Loaded sharded, then quantized, then placed by the quantized rules.
    quant = dict(kw, quantization="int8")
    report["int8"] = {"want": run(LLM("smollm2-135m", **quant))}
    llm = LLM("smollm2-135m", mesh=(1, 2), **quant)
    report["int8"]["got"] = run(llm)
    report["int8"]["w_up"] = spec_list(llm.params["layers_0"]["w_up"].values)
    return report


def worker_kv_int8(tmp: Path) -> dict:
    """The int8 page pool through the engine at model=2, against the unsharded int8 engine."""
    from jax_infer import LLM, SamplingParams

    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, TINY_VOCAB, size=n).tolist() for n in (1, 11)]
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    kw = dict(progress=False, max_model_len=64, num_pages=32, max_num_seqs=4)
    kw["kv_cache_dtype"] = "int8"
    path = str(tmp / "llama")
    want = [o.token_ids for o in LLM(path, **kw).generate(prompts, greedy)]
    llm = LLM(path, mesh=(1, 2), **kw)
    before = llm.engine.cache[0][0]
    got = [o.token_ids for o in llm.generate(prompts, greedy)]
    pool = llm.engine.cache[0][0]
    return {
        "devices": jax.device_count(),
        "want": want,
        "got": got,
        "donated": before.values.is_deleted() and before.scales.is_deleted(),
        "values": spec_list(pool.values),
        "scales": spec_list(pool.scales),
    }


def worker_fast(tmp: Path) -> dict:
    """Both fast workers in one interpreter (one jax start-up)."""
    return {"devices": jax.device_count(), "engine": worker_engine(tmp), "quant": worker_quant(tmp)}


WORKERS = {"fast": worker_fast, "kv_int8": worker_kv_int8, "smollm2": worker_smollm2}


def run_worker(mode: str, tmp: Path, timeout: float) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_sharding_engine", mode, str(tmp)],
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
    report = json.loads((tmp / f"{mode}.json").read_text())
    assert report["devices"] == NUM_DEVICES
    return report


def write_tokenizer(directory: Path, size: int) -> None:
    """A word-level tokenizer.json ("t0" .. "t{size-1}") so that `LLM(path)` can load a tiny
    model; the tests prompt with token ids."""
    import tokenizers

    vocab = {f"t{i}": i for i in range(size)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))


# == engine tests =========================================================================


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from tests.tiny_models import make_hf_model

    tmp = tmp_path_factory.mktemp("sharding_engine")
    make_hf_model("llama", tmp / "llama", vocab_size=TINY_VOCAB)
    write_tokenizer(tmp / "llama", TINY_VOCAB)
    return tmp


@pytest.fixture(scope="module")
def fast_report(tiny_dir) -> dict:
    return run_worker("fast", tiny_dir, timeout=500)


@pytest.fixture(scope="module")
def engine_report(fast_report) -> dict:
    return fast_report["engine"]


@pytest.fixture(scope="module")
def quant_report(fast_report) -> dict:
    return fast_report["quant"]


@pytest.mark.parametrize("data, model", ENGINE_MESHES)
def test_paged_engine_greedy_equals_unsharded(engine_report, data, model):
    entry = engine_report["engine"][mesh_name(data, model)]
    assert entry["got"] == engine_report["want"]
    assert all(len(ids) == 6 for ids in entry["got"])


@pytest.mark.parametrize("data, model", ENGINE_MESHES)
def test_page_pool_split_by_kv_heads_and_donated(engine_report, data, model):
    """N=4, K=2: at model=2 kv heads and the pool split; at model=4 they are replicated while
    queries still split; `data` splits the pool by pages (each data replica holds its own
    pages: scheduler/replicas.py)."""
    entry = engine_report["engine"][mesh_name(data, model)]
    kv = "model" if model == 2 else None
    pages = "data" if data > 1 else None
    assert entry["pool_spec"] == [pages, None, kv, None]
    assert entry["pool_out_specs"] == [str([pages, None, kv, None])], "a step resharded the pool"
    assert entry["pool_devices"] == data * model
    assert entry["donated"], "the step did not consume the donated pool"
    assert entry["wk"] == [None, kv]
    assert entry["wq"] == [None, "model" if model > 1 else None]


def test_static_engine_splits_batch_over_data(engine_report):
    # Greedy static-batch and paged outputs agree on this model (both f32, same logits).
    assert engine_report["static"] == engine_report["want"]


def test_int8_page_pool_values_and_scales_split_by_kv_heads(engine_report):
    pools = engine_report["int8_pool"]
    assert pools["1x2"]["values"] == [None, None, "model", None]
    assert pools["1x2"]["scales"] == [None, None, "model"]
    assert pools["1x2"]["scale_shards"] == [[8, 4, 1]] * 2
    # K=2 over model=4: replicated, and data never splits a pool.
    assert pools["2x4"]["values"] == [None, None, None, None]
    assert pools["2x4"]["scales"] == [None, None, None]


@pytest.mark.slow
def test_int8_page_pool_through_the_engine(tiny_dir):
    report = run_worker("kv_int8", tiny_dir, timeout=400)
    assert report["got"] == report["want"]
    assert report["values"] == [None, None, "model", None]
    assert report["scales"] == [None, None, "model"]
    assert report["donated"]


# == quantized params ====================================================================


def expected_quant_specs(path: str, shape: list, model: int, scheme: str) -> list:
    """The rules restated for the stored arrays of QUANT_CONFIG's matrices: a matrix's output
    columns split when its heads (q/kv) divide `model` and its 64-column tiles do; its input
    rows when they (and K/8 for int4, and the groups unless there is one) do."""
    c = QUANT_CONFIG
    d, f, v, hd = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["head_dim"]
    n_q, n_kv = c["num_heads"], c["num_kv_heads"]
    # name -> (K, N, heads splitting K, heads splitting N); embed is stored as the head [D, V].
    matrices = {
        "wq": (d, n_q * hd, None, n_q),
        "wk": (d, n_kv * hd, None, n_kv),
        "wv": (d, n_kv * hd, None, n_kv),
        "wo": (n_q * hd, d, n_q, None),
        "w_gate": (d, f, None, None),
        "w_up": (d, f, None, None),
        "w_down": (f, d, None, None),
        "embed": (d, v, None, None),
    }
    *parents, field = path.split("/")
    name = parents[-1] if parents else field
    if name not in matrices:  # norms
        return [None] * len(shape)
    if name == "embed" and "+embed" not in scheme:
        return ["model" if v % model == 0 else None, None]
    k, n, k_heads, n_heads = matrices[name]
    bits = 4 if scheme.startswith("int4") else 8
    group = {8: k, 4: 32}[bits] if "-g32" not in scheme else 32
    if name == "embed" and bits == 4:
        group = 16  # quant.transform.DEFAULT_INT4_EMBED_GROUP
    groups = k // group
    split_out = n % (64 * model) == 0 and (n_heads is None or n_heads % model == 0)
    split_in = (
        (k // (8 if bits == 4 else 1)) % model == 0
        and (groups == 1 or groups % model == 0)
        and (k_heads is None or k_heads % model == 0)
    )
    if name in ("wo", "w_down"):
        split_out = False  # their output is "embed": replicated
    else:
        split_in = False  # their input is "embed" (the embedding's too, stored as [D, V])
    out = "model" if split_out else None
    inp = "model" if split_in else None
    layout = {
        "values": (out, inp, None),
        "packed": (out, inp, None),
        "scales": (inp if groups > 1 else None, out),
        "block_scale": (inp if groups > 1 else None, out),
        "block_min": (inp if groups > 1 else None, out),
        "scale_step": (out,),
        "min_step": (out,),
    }
    return list(layout[field])


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("data, model", QUANT_MESHES)
def test_quantized_placement_matches_rules(quant_report, scheme, data, model):
    arrays = quant_report["placement"][f"{scheme}@{mesh_name(data, model)}"]
    split_any = False
    for path, info in arrays.items():
        want = expected_quant_specs(path, info["shape"], model, scheme)
        assert info["spec"] == want, path
        local = [n // (model if s else 1) for n, s in zip(info["shape"], want)]
        assert info["shards"] == [str(local)], path
        split_any |= "model" in want
    assert split_any
    # The fallback is exercised: wk's 64 columns are one tile, which never splits.
    wk = arrays["layers_0/wk/" + ("packed" if scheme.startswith("int4") else "values")]
    assert wk["spec"] == [None, None, None]


@pytest.mark.parametrize("formulation, scheme, mesh", LOGIT_CASES)
def test_quantized_logits_on_mesh_equal_unsharded(quant_report, formulation, scheme, mesh):
    if formulation == "kernel":
        assert quant_report["kernels"] != 0, "the CPU kernels did not build: nothing to compare"
    err = quant_report["logits"][f"{formulation}/{scheme}@{mesh_name(*mesh)}"]
    # The same quantized arrays, summed in another order across devices.
    assert err <= 1e-5, f"relative logit error {err}"


# == the real model ======================================================================


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_engine_on_mesh(tmp_path, gguf_path):
    report = run_worker("smollm2", tmp_path, timeout=900)
    for data, model in SMOLLM2_MESHES:
        entry = report[mesh_name(data, model)]
        assert entry["got"] == report["want"], (data, model)
        # 9 q / 3 kv heads divide neither 2 nor 4: attention replicated over model; the pool
        # split by pages over data (one slice per data replica).
        assert entry["pool"] == ["data" if data > 1 else None, None, None, None]
        assert entry["w_up"] == [None, "model"]
    int8 = report["int8"]
    assert int8["got"] == int8["want"]
    assert int8["w_up"] == ["model", None, None]  # 1,536 channels: 24 tiles, 12 per device


if __name__ == "__main__":
    # Before anything initializes the backend: this interpreter exists to get 8 devices.
    jax.config.update("jax_num_cpu_devices", NUM_DEVICES)
    mode, directory = sys.argv[1], Path(sys.argv[2])
    result = WORKERS[mode](directory)
    (directory / f"{mode}.json").write_text(json.dumps(result))
