"""Data parallelism in the continuous engine.

Host side (fast, no model): `scheduler.replicas.ReplicatedScheduler` assigns requests to the
least loaded replica by pages, keeps each request in its replica, routes updates and aborts
there, and never shares a page across replicas.

Engine (slow; a subprocess with 8 simulated CPU devices, like tests/test_sharding.py): greedy
outputs of `LLM` with data=2 and data=4 (and 2x2) equal the single-device ones; with data=2 a
step runs twice the rows (engine stats) and the requests of one call split evenly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jax_infer.scheduler import Request, RequestStatus
from jax_infer.scheduler.replicas import ReplicatedScheduler

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 128


def make(num_replicas: int = 2, **overrides) -> ReplicatedScheduler:
    kwargs = dict(
        num_pages=17, page_size=4, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64
    )
    return ReplicatedScheduler(num_replicas=num_replicas, **(kwargs | overrides))


def req(rid: str, n: int = 6, max_tokens: int = 4) -> Request:
    return Request(rid, list(range(100, 100 + n)), max_tokens=max_tokens)


def step(sched: ReplicatedScheduler, token: int = 7):
    out = sched.schedule()
    sampled = {s.request_id: [token] for s in out.scheduled if s.sample}
    done = sched.update(out, sampled)
    sched.check_invariants()
    return out, done


def test_equal_requests_alternate_between_replicas():
    sched = make(num_replicas=3)
    got = [sched.add_request(req(f"r{i}")) for i in range(7)]
    assert got == [0, 1, 2, 0, 1, 2, 0]
    assert sched.num_assigned == [3, 2, 2]


def test_assignment_follows_free_pages():
    sched = make(max_num_batched_tokens=64)
    # A long prompt takes 16 of replica 0's 16 pages once admitted; the short ones go to 1
    # until its queue needs as many pages as replica 0 has left.
    assert sched.add_request(req("long", n=60)) == 0
    assert [sched.add_request(req(f"s{i}", n=4)) for i in range(3)] == [1, 1, 1]
    step(sched)
    # Running now: replica 0 holds 15 pages (60 tokens), replica 1 three.
    assert sched.replicas[0].allocator.num_free() == 1
    assert sched.add_request(req("next", n=4)) == 1


def test_rows_of_every_replica_in_one_step_and_pages_stay_local():
    sched = make(max_num_seqs=2)
    for i in range(4):
        sched.add_request(req(f"r{i}", n=3, max_tokens=3))
    out, _ = step(sched)
    # Two seats per replica: all four requests run in the first step, two per replica.
    assert len(out.scheduled) == 4 and out.replicas == [0, 0, 1, 1]
    for s, d in zip(out.scheduled, out.replicas):
        assert sched.replica_of(s.request_id) == d
        assert all(1 <= p < 17 for p in s.block_table)  # the replica's own page ids
    finished = []
    while sched.has_unfinished():
        finished += step(sched)[1]
    assert sorted(r.request_id for r in finished) == ["r0", "r1", "r2", "r3"]
    assert all(s.allocator.num_used() == 0 for s in sched.replicas)


def test_abort_and_errors_reach_the_right_replica():
    sched = make()
    for i in range(4):
        sched.add_request(req(f"r{i}"))
    step(sched)
    assert sched.abort("r1")
    assert not sched.abort("r1") and not sched.abort("nope")
    assert [r.request_id for r in sched.pop_finished()] == ["r1"]
    out = sched.schedule()
    ids = [s.request_id for s in out.scheduled]
    done = sched.update(out, {}, finished=dict.fromkeys(ids, "error"))
    assert {r.request_id for r in done} == {"r0", "r2", "r3"}
    assert all(r.status is RequestStatus.FINISHED_ERROR for r in done)
    assert not sched.has_unfinished()
    with pytest.raises(ValueError, match="unknown request 'r0'"):
        sched.update(sched.schedule(), {"r0": [1]})


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_replicas must be an int >= 1, got 0"):
        make(num_replicas=0)
    sched = make()
    with pytest.raises(ValueError, match="exceeds max_model_len=64"):
        sched.add_request(req("big", n=62, max_tokens=4))
    assert sched.num_assigned == [0, 0]
    assert not sched.has_unfinished()


def test_metadata_laid_out_in_a_common_shape():
    """Two replicas' steps (one decode-only, one with a prompt chunk) padded to one shape keep
    their real rows where their own layout puts them; an idle replica is all padding."""
    from jax_infer.attention.metadata import build_metadata, common_shape, step_shape

    a = ([5, 9], [1, 1], [[1, 2], [3, 8, 9]], 4)  # two decodes
    b = ([0], [13], [[4, 5, 6, 7]], 4)  # one 13-token chunk
    own_a, own_b = build_metadata(*a)[0], build_metadata(*b)[0]
    shape = common_shape([step_shape(own_a), step_shape(own_b)])
    assert shape == (2, 1, 32, 32, 4)  # decode rows in 2x buckets
    for args in (a, b):
        meta, order, offsets = build_metadata(*args, at_least=shape)
        assert step_shape(meta) == shape
        rows = [r for r, i in enumerate(order) if i >= 0]
        for r in rows:
            i = order[r]
            n = args[1][i]
            flat = offsets[i]
            assert meta.kv_lens[r] == args[0][i] + n
            assert list(meta.positions[flat : flat + n]) == list(range(args[0][i], args[0][i] + n))
            assert meta.logits_index[r] == flat + n - 1
            assert list(meta.block_tables[r][: len(args[2][i])]) == args[2][i]
    idle, order, _ = build_metadata([], [], [], 4, at_least=shape)
    assert step_shape(idle) == shape and (order == -1).all()
    assert not idle.positions.any() and (idle.kv_lens == 1).all()
    with pytest.raises(ValueError, match="non-zero numbers"):
        build_metadata([], [], [], 4)


# == engine: a subprocess with 8 simulated devices ========================================

PROMPT_LENGTHS = (1, 11, 5, 3, 20, 7, 2, 9)
MESHES = [(2, 1), (4, 1), (2, 2)]


def worker(tmp: Path) -> dict:
    import jax

    from jax_infer import LLM, SamplingParams

    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, VOCAB, size=n).tolist() for n in PROMPT_LENGTHS]
    # One-token prompts: every row is a decode from the first step, so rows per step are
    # bounded by the seats (max_num_seqs=4 per replica), not by one prefill chunk per step.
    decodes = [[int(t)] for t in rng.integers(0, VOCAB, size=8)]
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    kw = dict(progress=False, max_model_len=64, num_pages=32, max_num_seqs=4)
    path = str(tmp / "llama")

    def run(mesh) -> dict:
        llm = LLM(path, mesh=mesh, **kw)
        mixed = [o.token_ids for o in llm.generate(prompts, greedy)]
        before = llm.engine.stats()
        first_call = before["replica_requests"]
        decoded = [o.token_ids for o in llm.generate(decodes, greedy)]
        after = llm.engine.stats()
        return {
            "mixed": mixed,
            "decodes": decoded,
            "decode_steps": after["num_steps"] - before["num_steps"],
            "decode_rows": after["num_rows"] - before["num_rows"],
            "max_rows_per_step": after["max_rows_per_step"],
            "replica_requests": [first_call, after["replica_requests"]],
            "kv_usage_after": after["kv_usage"],
        }

    report = {"devices": jax.device_count(), "want": run(None)}
    for data, model in MESHES:
        report[f"{data}x{model}"] = run((data, model))
    return report


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    from tests.test_multiprocess import write_tokenizer
    from tests.tiny_models import make_hf_model

    tmp = tmp_path_factory.mktemp("data_parallel")
    make_hf_model("llama", tmp / "llama", vocab_size=VOCAB)
    write_tokenizer(tmp / "llama", VOCAB)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_data_parallel", str(tmp)],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8", PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    out = json.loads((tmp / "report.json").read_text())
    assert out["devices"] == 8
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [f"{d}x{m}" for d, m in MESHES])
def test_greedy_with_data_replicas_equals_one_device(report, mesh):
    assert report[mesh]["mixed"] == report["want"]["mixed"]
    assert report[mesh]["decodes"] == report["want"]["decodes"]
    assert report[mesh]["kv_usage_after"] == 0.0


@pytest.mark.slow
def test_data_replicas_multiply_rows_per_step(report):
    one, two, four = report["want"], report["2x1"], report["4x1"]
    # 8 one-token requests x 6 tokens = 48 rows: 4 seats per step on one replica, 8 on two.
    assert one["decode_rows"] == two["decode_rows"] == four["decode_rows"] == 48
    assert one["max_rows_per_step"] == 4 and two["max_rows_per_step"] == 8
    assert one["decode_steps"] == 12 and two["decode_steps"] == 6
    # Four replicas have 16 seats: all 8 requests every step.
    assert four["decode_steps"] == 6 and four["max_rows_per_step"] == 8


@pytest.mark.slow
def test_requests_balanced_across_replicas(report):
    # Two calls of 8 requests each (the first of mixed prompt lengths): evenly split within
    # each call.
    assert report["2x1"]["replica_requests"] == [[4, 4], [8, 8]]
    assert report["4x1"]["replica_requests"] == [[2, 2, 2, 2], [4, 4, 4, 4]]


if __name__ == "__main__":
    directory = Path(sys.argv[1])
    (directory / "report.json").write_text(json.dumps(worker(directory)))
