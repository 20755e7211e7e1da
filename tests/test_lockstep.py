"""`jax_infer.lockstep` on one process: the leader's messages, replayed by a follower.

An in-memory key-value store stands in for jax.distributed's; two real engines (the tiny
llama model, one device each) play process 0 and process 1. A follower fed process 0's
messages must end in the same state and produce the same tokens step by step, which is what
lets the processes of a multi-process server run one sharded step together. The real job
(2 processes, HTTP, the openai client) is tests/test_multiprocess_server.py.
"""

from __future__ import annotations

import pickle
import threading

import pytest

from jax_infer import lockstep


class FakeStore:
    """The slice of jax's DistributedRuntimeClient that Channel uses."""

    def __init__(self):
        self.values: dict[str, bytes] = {}
        self.cond = threading.Condition()

    def key_value_set_bytes(self, key, value):
        with self.cond:
            assert key not in self.values, f"{key} set twice"
            self.values[key] = value
            self.cond.notify_all()

    def blocking_key_value_get_bytes(self, key, timeout_ms):
        with self.cond:
            if not self.cond.wait_for(lambda: key in self.values, timeout_ms / 1000):
                raise RuntimeError(f"DEADLINE_EXCEEDED: {key}")
            return self.values[key]

    def key_value_try_get_bytes(self, key):
        with self.cond:
            if key not in self.values:
                raise RuntimeError(f"NOT_FOUND: {key}")
            return self.values[key]

    def key_value_delete(self, key):
        with self.cond:
            del self.values[key]


def step_number(item) -> int:
    return int(item[0].split("/")[-2])


def channel(store, process: int, num_processes: int = 2) -> lockstep.Channel:
    ch = lockstep.Channel.__new__(lockstep.Channel)
    ch.client, ch.prefix = store, f"{lockstep.KEY_PREFIX}/test"
    ch.num_processes, ch.process, ch.poll_ms = num_processes, process, 50
    return ch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.test_multiprocess import VOCAB, write_tokenizer
    from tests.tiny_models import make_hf_model

    path = tmp_path_factory.mktemp("lockstep") / "llama"
    make_hf_model("llama", path, vocab_size=VOCAB)
    write_tokenizer(path, VOCAB)
    return str(path)


def engine(path, **kw):
    from jax_infer import LLM

    args = dict(progress=False, max_model_len=64, num_pages=16, max_num_seqs=2)
    return LLM(path, **{**args, **kw}).engine


def test_follower_replays_the_leaders_steps(tiny):
    from jax_infer import SamplingParams

    store = FakeStore()
    leader = lockstep.LeaderEngine(engine(tiny), channel(store, 0))
    follower = engine(tiny)
    greedy = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    sampled = SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True, n=2)  # drawn seed
    leader.add_request([1, 2, 3], greedy, request_id="a")
    leader.add_request([4, 5, 6, 7], sampled, request_id="b")
    leader.add_request([9] * 9, greedy, request_id="c")  # waits: max_num_seqs=2
    with pytest.raises(ValueError, match="already in use"):
        leader.add_request([1], greedy, request_id="a")  # refused here: never replayed
    leader_tokens = {}
    for i in range(12):
        if i == 2:
            leader.abort("c")
        for out in leader.step():
            leader_tokens[out.request_id] = list(out.token_ids)
    leader.stop()
    assert not leader.has_unfinished_requests()  # the wrapped engine's, through __getattr__

    # The follower's steps, replayed from the store alone, give the same tokens.
    tokens = {}
    original = follower.step

    def step():
        outs = original()
        for out in outs:
            tokens[out.request_id] = list(out.token_ids)
        return outs

    follower.step = step
    stats = lockstep.follow(follower, channel(store, 1))
    assert (stats.steps, stats.requests, stats.aborts) == (12, 3, 1)
    assert tokens == leader_tokens
    assert len(leader_tokens["a"]) == 5 and set(leader_tokens) >= {"b#0", "b#1", "c"}
    assert not store.values  # each message deleted by its reader
    with pytest.raises(lockstep.LockstepError, match="stopped"):
        leader.step()


def test_a_different_engine_is_refused(tiny):
    store = FakeStore()
    leader = lockstep.LeaderEngine(engine(tiny), channel(store, 0))
    leader.stop()
    with pytest.raises(lockstep.LockstepError, match=r"differs from process 0's in engine_config"):
        lockstep.follow(engine(tiny, max_num_seqs=3), channel(store, 1))


def test_a_failing_leader_step_stops_the_followers_with_its_error(tiny):
    store = FakeStore()
    leader = lockstep.LeaderEngine(engine(tiny), channel(store, 0))

    def boom():
        raise MemoryError("host out of memory")

    leader.engine.step = boom
    with pytest.raises(MemoryError):
        leader.step()
    messages = [pickle.loads(v) for _, v in sorted(store.values.items(), key=step_number)]
    assert messages[-1] == (
        ("stop", "process 0's engine step raised MemoryError: host out of memory"),
    )
    with pytest.raises(lockstep.LockstepError, match="process 0 stopped: .*MemoryError"):
        lockstep.follow(engine(tiny), channel(store, 1))


def test_an_idle_follower_polls_until_told_to_stop():
    store = FakeStore()
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) >= 2

    ch = channel(store, 1)
    assert ch.receive(0, should_stop) is None
    assert len(calls) == 2


def test_an_idle_follower_stops_when_process_0_aborts():
    store = FakeStore()
    channel(store, 0).abort("address already in use")
    with pytest.raises(lockstep.LockstepError, match="process 0 stopped: address already in use"):
        channel(store, 1).receive(0)


def test_a_channel_needs_jax_distributed():
    with pytest.raises(lockstep.LockstepError, match="needs jax.distributed"):
        lockstep.Channel()
