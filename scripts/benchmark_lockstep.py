"""Per-step messaging cost of multi-process serving (`jax_infer.lockstep`).

python scripts/launch_local.py --num_processes 2 --devices_per_process 4 -- \
    scripts/benchmark_lockstep.py --iterations 300 --json lockstep.json

Process 0 publishes the messages a served step sends (a plain decode step; a step adding one
request of 128 or 2,048 prompt tokens) through the jax.distributed key-value store, as
`LeaderEngine` does; each follower reads it (`Channel.receive`, deleting it) and answers
with an acknowledgement, which process 0 waits for. Half the round trip is what one step's
message adds before the followers can enter the step. For scale, the table also times a
jitted cross-process all-reduce of one scalar, the least collective every sharded step
already pays. Only process 0 prints and writes the JSON.
"""

from __future__ import annotations

import json
import pickle
import statistics
import time

import jax
import numpy as np
from absl import app, flags

from jax_infer import SamplingParams, lockstep, sharding
from jax_infer.distributed import initialize_distributed

FLAGS = flags.FLAGS
flags.DEFINE_integer("iterations", 300, "Round trips per message kind.", lower_bound=1)
flags.DEFINE_string("json", None, "Write the results to this JSON file.")


def messages() -> dict[str, bytes]:
    params = SamplingParams(temperature=0.7, max_tokens=256, seed=1)

    def add(n):
        ops = (("add", list(range(n)), params, f"cmpl-{n}"), ("step",))
        return pickle.dumps(ops, protocol=pickle.HIGHEST_PROTOCOL)

    step = pickle.dumps((("step",),), protocol=pickle.HIGHEST_PROTOCOL)
    return {"decode step": step, "step + add 128 tokens": add(128), "step + add 2048": add(2048)}


def ping_pong(channel: lockstep.Channel, payload: bytes, first: int, n: int) -> list[float]:
    """Round-trip seconds of n messages numbered from `first` (process 0's view)."""
    client, times = channel.client, []
    for i in range(first, first + n):
        if channel.process == 0:
            start = time.perf_counter()
            channel.publish(i, payload)
            for p in range(1, channel.num_processes):
                key = f"{channel.prefix}/ack/{i}/{p}"
                client.blocking_key_value_get_bytes(key, 60_000)
                client.key_value_delete(key)
            times.append(time.perf_counter() - start)
        else:
            got = channel.receive(i)
            assert got == payload
            client.key_value_set_bytes(f"{channel.prefix}/ack/{i}/{channel.process}", b"")
    return times


def all_reduce_times(n: int) -> list[float]:
    mesh = sharding.make_mesh(1, jax.device_count())
    x = jax.device_put(
        np.ones(jax.device_count(), np.float32),
        jax.sharding.NamedSharding(mesh, jax.P(sharding.MODEL)),
    )
    total = jax.jit(lambda a: a.sum(), out_shardings=jax.sharding.NamedSharding(mesh, jax.P()))
    total(x).block_until_ready()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        total(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return times


def main(argv):
    del argv
    if not initialize_distributed():
        raise SystemExit("run under scripts/launch_local.py (or another multi-process launch)")
    channel = lockstep.Channel("benchmark")
    rows, first = [], 0
    for name, payload in messages().items():
        ping_pong(channel, payload, first, 10)  # warm up
        times = ping_pong(channel, payload, first + 10, FLAGS.iterations)
        first += 10 + FLAGS.iterations
        if times:
            rows.append((name, len(payload), times))
    reduce = all_reduce_times(FLAGS.iterations)
    if jax.process_index() != 0:
        return
    print(
        f"{jax.process_count()} processes x {jax.local_device_count()} {jax.default_backend()} "
        f"devices, {FLAGS.iterations} iterations each"
    )
    print(f"{'message':<24}{'bytes':>8}{'one way (us)':>15}{'p90 (us)':>10}")
    results = []
    for name, size, times in rows:
        one_way = [t / 2 * 1e6 for t in times]
        med, p90 = statistics.median(one_way), float(np.percentile(one_way, 90))
        print(f"{name:<24}{size:>8}{med:>15.0f}{p90:>10.0f}")
        results.append({"message": name, "bytes": size, "one_way_us": med, "p90_us": p90})
    red = [t * 1e6 for t in reduce]
    print(f"{'all-reduce of 1 scalar':<24}{'':>8}{statistics.median(red):>15.0f}")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump({"messages": results, "all_reduce_us": statistics.median(red)}, f, indent=2)


if __name__ == "__main__":
    app.run(main)
