"""Multi-controller JAX on one machine: 2 processes x 4 simulated CPU devices, one mesh.

`scripts/launch_local.py` starts two copies of this file (`python -m tests.test_multiprocess
llm DIR`); each calls `initialize_distributed()` (coordinator on 127.0.0.1, gloo
collectives), builds `LLM` on meshes that span both processes, and writes what it saw to
DIR/p{process}.json: greedy token ids and top-5 logprobs of each mesh, and which shards of
the weights and the page pool its own devices hold, read back from the arrays. The tests
compare those to a single-process, unsharded `LLM` run here, and to the sharding rules.

The kill test starts the same job, kills process 1 once its mesh is up, and checks that the
launcher exits non-zero naming it and that no process of the job is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "scripts" / "launch_local.py"
NUM_PROCESSES, DEVICES_PER_PROCESS = 2, 4
MESHES = [(2, 4), (1, 8), (8, 1)]
VOCAB = 128
PROMPT_LENGTHS = (1, 11, 5)
KW = dict(progress=False, max_model_len=64, num_pages=32, max_num_seqs=4)
MAX_TOKENS = 6
# Top-5 logprobs of the sharded run against the unsharded one (f32; the sums split over
# devices change the rounding only).
LOGPROB_ATOL = 1e-4

pytestmark = pytest.mark.slow


def prompts() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, VOCAB, size=n).tolist() for n in PROMPT_LENGTHS]


def sampling():
    from jax_infer import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5)


def outputs(llm) -> dict:
    outs = llm.generate(prompts(), sampling())
    return {
        "tokens": [o.token_ids for o in outs],
        "logprobs": [
            [sorted((int(t), float(v)) for t, v in entry.items()) for entry in o.logprobs]
            for o in outs
        ],
    }


def local_shards(array) -> dict:
    """What this process holds of a global array: each addressable shard's index (as
    [start, stop] per dim) and process, and the bytes held against the whole array's."""
    import jax

    shards = array.addressable_shards
    return {
        "indices": sorted(
            [
                [s.start or 0, s.stop if s.stop is not None else n]
                for s, n in zip(sh.index, array.shape)
            ]
            for sh in shards
        ),
        "processes": sorted({sh.device.process_index for sh in shards}),
        "local_bytes": sum(sh.data.nbytes for sh in shards),
        "global_bytes": array.nbytes,
        "shape": list(array.shape),
        "this_process": jax.process_index(),
    }


# == worker: one process of the launched job ============================================


def worker_llm(tmp: Path) -> None:
    from jax_infer.distributed import initialize_distributed

    assert initialize_distributed(), "the launcher's environment should start jax.distributed"
    import jax

    from jax_infer import LLM

    report: dict = {
        "process": jax.process_index(),
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "meshes": {},
    }
    for data, model in MESHES:
        for fmt, path in (("hf", tmp / "llama"), ("orbax", tmp / "orbax")):
            if fmt == "orbax" and (data, model) != (2, 4):
                continue  # one mesh is enough to check the orbax path
            llm = LLM(str(path), mesh=(data, model), **KW)
            entry = outputs(llm)
            params = llm.params["layers_0"]
            entry["shards"] = {
                name: local_shards(params[name]) for name in ("wq", "wk", "w_up", "w_down")
            }
            entry["shards"]["embed"] = local_shards(llm.params["embed"])
            entry["shards"]["pool"] = local_shards(jax.tree.leaves(llm.engine.cache)[0])
            report["meshes"][f"{fmt}-{data}x{model}"] = entry
            del llm
    (tmp / f"p{jax.process_index()}.json").write_text(json.dumps(report))


def worker_hang(tmp: Path) -> None:
    """Forms the mesh, says so, then waits (to be killed by the test)."""
    from jax_infer.distributed import initialize_distributed

    initialize_distributed()
    import jax

    from jax_infer import sharding

    mesh = sharding.make_mesh(2, 4)
    x = jax.device_put(np.arange(8.0), jax.sharding.NamedSharding(mesh, jax.P("data")))
    total = float(jax.jit(lambda a: a.sum())(x))
    (tmp / f"ready{jax.process_index()}").write_text(f"{total} {os.getpid()}")
    time.sleep(600)


QUANT_SCHEMES = ("int8", "int4-g8")
QUANT_LEAVES = ("layers_0/wo", "layers_0/w_down", "layers_0/w_up")
# model=8 spans both processes, so a split array is half on each; F=512 splits by 8 in
# both formats' tile layouts (the default F=112 does not).
QUANT_MESH, QUANT_FFN = (1, 8), 512


def worker_quant(tmp: Path) -> None:
    """Restores the quantized orbax checkpoints on a 1x8 mesh and reports, per stored array,
    the spec, this process's shards, and whether each shard equals the slice of the array
    the single process saved (tmp/{scheme}.npz)."""
    from jax_infer.distributed import initialize_distributed

    initialize_distributed()
    import jax

    from jax_infer import sharding
    from jax_infer.quant.transform import split_quantized
    from jax_infer.weights import load_orbax

    mesh = sharding.make_mesh(*QUANT_MESH)
    report = {}
    for scheme in QUANT_SCHEMES:
        _, params, meta = load_orbax(str(tmp / f"orbax-{scheme}"), progress=False, mesh=mesh)
        saved = np.load(tmp / f"{scheme}.npz")
        for leaf in QUANT_LEAVES:
            layer, name = leaf.split("/")
            q = params[layer][name]
            for field in split_quantized({"x": q})[0]["x"]:
                array = getattr(q, field)
                entry = local_shards(array)
                entry["spec"] = str(array.sharding.spec)
                whole = saved[f"{leaf}/{field}"]
                entry["equal"] = all(
                    np.array_equal(np.asarray(sh.data), whole[sh.index])
                    for sh in array.addressable_shards
                )
                report[f"{scheme}:{leaf}/{field}"] = entry
    (tmp / f"q{jax.process_index()}.json").write_text(json.dumps(report))


WORKERS = {"llm": worker_llm, "hang": worker_hang, "quant": worker_quant}


# == the tests ===========================================================================


def launch(mode: str, tmp: Path, timeout: float = 900) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        str(LAUNCHER),
        f"--num_processes={NUM_PROCESSES}",
        f"--devices_per_process={DEVICES_PER_PROCESS}",
        f"--timeout={timeout}",
        "--",
        "-m",
        "tests.test_multiprocess",
        mode,
        str(tmp),
    ]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """The launcher's exit code and stderr; its process group is killed whatever happens."""
    try:
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def write_tokenizer(directory: Path, size: int) -> None:
    import tokenizers

    vocab = {f"t{i}": i for i in range(size)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    """The tiny model (safetensors and orbax), the single-process reference, and both
    processes' reports."""
    from jax_infer import LLM
    from tests.tiny_models import make_hf_model

    tmp = tmp_path_factory.mktemp("multiprocess")
    make_hf_model("llama", tmp / "llama", vocab_size=VOCAB)
    write_tokenizer(tmp / "llama", VOCAB)
    reference = LLM(str(tmp / "llama"), **KW)
    reference.save(str(tmp / "orbax"))
    want = outputs(reference)
    del reference
    code, err = finish(launch("llm", tmp), timeout=1000)
    assert code == 0, f"launch_local exited {code}:\n{err[-6000:]}"
    reports = [json.loads((tmp / f"p{i}.json").read_text()) for i in range(NUM_PROCESSES)]
    return {"want": want, "reports": reports}


def test_processes_form_one_mesh(job):
    for i, r in enumerate(job["reports"]):
        assert (r["process"], r["processes"]) == (i, NUM_PROCESSES)
        assert (r["devices"], r["local_devices"]) == (8, DEVICES_PER_PROCESS)


@pytest.mark.parametrize("name", ["hf-2x4", "hf-1x8", "hf-8x1", "orbax-2x4"])
def test_greedy_and_logprobs_equal_single_process(job, name):
    want = job["want"]
    for r in job["reports"]:
        got = r["meshes"][name]
        assert got["tokens"] == want["tokens"]
        for got_rows, want_rows in zip(got["logprobs"], want["logprobs"]):
            for g, w in zip(got_rows, want_rows):
                assert [t for t, _ in g] == [t for t, _ in w]
                np.testing.assert_allclose([v for _, v in g], [v for _, v in w], atol=LOGPROB_ATOL)


# How the default rules split each array of the tiny llama (N=4 query heads, K=2 kv heads,
# F=112, V=128), restated: weight -> (dim, unit count the model axis must divide). The page
# pool [P, L, K, H] is split by kv heads over model the same way, and by pages over data
# (each data replica holds its own pages).
SPLITS = {
    "wq": (1, 4),
    "wk": (1, 2),
    "w_up": (1, 112),
    "w_down": (0, 112),
    "embed": (0, 128),
    "pool": (2, 2),
}


def expected_ways(weight: str, data: int, model: int) -> dict[int, int]:
    """dim -> how many ways it is split."""
    dim, units = SPLITS[weight]
    ways = {dim: model} if model > 1 and units % model == 0 else {}
    if weight == "pool" and data > 1:
        ways[0] = data
    return ways


def spans_processes(weight: str, data: int, model: int) -> bool:
    """Whether a split axis runs across the two processes: the mesh orders devices process by
    process, so `data` does whenever data > 1 here, `model` only at model=8."""
    if weight == "pool" and data > 1:
        return True
    return model == 2 * DEVICES_PER_PROCESS and bool(expected_ways(weight, data, model))


def blocks(indices: list, dims) -> set[tuple]:
    return {tuple(tuple(index[d]) for d in sorted(dims)) for index in indices}


@pytest.mark.parametrize("name", ["hf-2x4", "hf-1x8", "hf-8x1", "orbax-2x4"])
def test_each_process_holds_only_its_shards(job, name):
    data, model = (int(n) for n in name.split("-")[1].split("x"))
    held = []
    for r in job["reports"]:
        shards = r["meshes"][name]["shards"]
        per_process = {}
        for weight in SPLITS:
            s = shards[weight]
            ways = expected_ways(weight, data, model)
            total = int(np.prod(list(ways.values()), dtype=int))
            # Only this process's 4 devices, one shard each, of the expected size.
            assert s["processes"] == [r["process"]], weight
            assert len(s["indices"]) == DEVICES_PER_PROCESS, weight
            assert s["local_bytes"] * total == s["global_bytes"] * DEVICES_PER_PROCESS, weight
            for index in s["indices"]:
                for d, ((start, stop), n) in enumerate(zip(index, s["shape"])):
                    assert stop - start == n // ways.get(d, 1), weight
            got = blocks(s["indices"], ways)
            spans = spans_processes(weight, data, model)
            assert len(got) == (total // NUM_PROCESSES if spans else total), weight
            per_process[weight] = (got, spans, total)
        held.append(per_process)
    for weight in SPLITS:
        (mine, spans, total), (theirs, _, _) = held[0][weight], held[1][weight]
        if spans:
            # The split runs across processes: each holds its own part, together all.
            assert not mine & theirs, weight
            assert len(mine | theirs) == total, weight
        else:
            assert mine == theirs, weight


def test_quantized_orbax_restores_each_processs_shards(tmp_path):
    """int8 and int4 checkpoints restore straight into the shardings `shard_params` gives
    the quantized params: a split array is never whole on a process (each holds, and reads,
    its half), each shard equals the saved array's slice."""
    import jax

    from jax_infer import LLM, sharding
    from jax_infer.quant.transform import split_quantized
    from tests.tiny_models import make_hf_model

    make_hf_model("llama", tmp_path / "llama", vocab_size=VOCAB, intermediate_size=QUANT_FFN)
    write_tokenizer(tmp_path / "llama", VOCAB)
    specs = {}
    for scheme in QUANT_SCHEMES:
        llm = LLM(str(tmp_path / "llama"), quantization=scheme, **KW)
        llm.save(str(tmp_path / f"orbax-{scheme}"))
        params = llm.canonical_params()
        plain, _ = split_quantized(params)
        flat = {
            sharding.path_str(kp): np.asarray(v)
            for kp, v in jax.tree_util.tree_leaves_with_path(plain)
        }
        np.savez(tmp_path / f"{scheme}.npz", **flat)
        want = sharding.param_specs(params, llm.config, dict(zip(("data", "model"), QUANT_MESH)))
        for leaf in QUANT_LEAVES:
            layer, name = leaf.split("/")
            q = want[layer][name]
            for field in split_quantized({"x": params[layer][name]})[0]["x"]:
                specs[f"{scheme}:{leaf}/{field}"] = getattr(q, field)
        del llm
    code, err = finish(launch("quant", tmp_path), timeout=600)
    assert code == 0, f"launch_local exited {code}:\n{err[-6000:]}"
    reports = [json.loads((tmp_path / f"q{i}.json").read_text()) for i in range(NUM_PROCESSES)]
    split = 0
    for r in reports:
        assert set(r) == set(specs)
        for key, s in r.items():
            assert s["equal"], key
            assert s["spec"] == str(specs[key]), key
            assert s["processes"] == [s["this_process"]], key
            if "model" in str(specs[key]):  # split over both processes: half is here
                assert 2 * s["local_bytes"] == s["global_bytes"], key
                split += 1
            else:
                assert s["local_bytes"] == DEVICES_PER_PROCESS * s["global_bytes"], key
    # Both formats split w_up by columns and w_down by rows (values and group scales).
    assert split >= 4 * NUM_PROCESSES * len(QUANT_SCHEMES), sorted(specs.items())


def test_killed_process_stops_the_job(tmp_path):
    proc = launch("hang", tmp_path, timeout=300)
    try:
        deadline = time.monotonic() + 240
        ready = [tmp_path / f"ready{i}" for i in range(NUM_PROCESSES)]
        while not all(p.exists() for p in ready):
            assert proc.poll() is None, proc.communicate()[1][-4000:]
            assert time.monotonic() < deadline, "the job did not form its mesh in time"
            time.sleep(0.2)
        pids = [int(p.read_text().split()[1]) for p in ready]
        assert [float(p.read_text().split()[0]) for p in ready] == [28.0, 28.0]
        os.kill(pids[1], signal.SIGKILL)
        code, err = finish(proc, timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code != 0
    assert f"process 1 (pid {pids[1]}) was killed by SIGKILL" in err, err[-3000:]
    # No orphan: every process of the job is gone (each child led its own process group).
    for pid in pids:
        assert not alive(pid), f"pid {pid} outlived the launcher"


def alive(pid: int) -> bool:
    """Whether pid names a live (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


if __name__ == "__main__":
    WORKERS[sys.argv[1]](Path(sys.argv[2]))
