"""Prometheus metrics of one server, in vLLM's names under the `jax_infer:` prefix.

Each app has its own CollectorRegistry (not prometheus-client's global one), so several
servers, or a test's apps, in one process do not share or collide on metrics. Counters the
engine keeps (prefix cache, speculative tokens, preemptions) and the process's XLA compile
count are copied in by the engine thread as increments (`AsyncEngine._publish`).
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# The duration event jax records once per XLA backend compile (jax._src.dispatch).
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compile_lock = threading.Lock()
_num_compiles: int | None = None  # None: no listener yet


def _on_jax_event(event: str, duration_secs: float, **kwargs) -> None:
    global _num_compiles
    if event == BACKEND_COMPILE_EVENT:
        with _compile_lock:
            _num_compiles += 1


def num_compiles() -> int:
    """XLA backend compiles in this process since the first call (which starts counting:
    one jax.monitoring listener per process)."""
    global _num_compiles
    with _compile_lock:
        if _num_compiles is None:
            import jax.monitoring

            _num_compiles = 0
            jax.monitoring.register_event_duration_secs_listener(_on_jax_event)
        return _num_compiles


_LATENCY_BUCKETS = (
    0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry = registry or CollectorRegistry()
        self.time_to_first_token = Histogram(
            "jax_infer:time_to_first_token_seconds",
            "Seconds from a request's arrival to its first output token.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.inter_token_latency = Histogram(
            "jax_infer:inter_token_latency_seconds",
            "Seconds between consecutive output tokens of a request.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.e2e_request_latency = Histogram(
            "jax_infer:e2e_request_latency_seconds",
            "Seconds from a request's arrival to its last token.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.request_queue_time = Histogram(
            "jax_infer:request_queue_time_seconds",
            "Seconds from a request's arrival to its first scheduled step.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.num_requests_running = Gauge(
            "jax_infer:num_requests_running", "Requests in the running batch.", registry=registry
        )
        self.num_requests_waiting = Gauge(
            "jax_infer:num_requests_waiting", "Requests waiting to run.", registry=registry
        )
        self.kv_cache_usage = Gauge(
            "jax_infer:kv_cache_usage_perc",
            "Fraction of KV cache pages held by requests (1 = full).",
            registry=registry,
        )
        # prometheus-client adds the _total suffix to counters.
        self.prompt_tokens = Counter(
            "jax_infer:prompt_tokens", "Prompt tokens of finished requests.", registry=registry
        )
        self.generation_tokens = Counter(
            "jax_infer:generation_tokens",
            "Generated tokens of finished requests.",
            registry=registry,
        )
        self.request_success = Counter(
            "jax_infer:request_success",
            "Finished requests by finish reason.",
            ["finished_reason"],
            registry=registry,
        )
        self.num_preemptions = Counter(
            "jax_infer:num_preemptions", "Requests preempted by the scheduler.", registry=registry
        )
        self.prefix_cache_queries = Counter(
            "jax_infer:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            registry=registry,
        )
        self.prefix_cache_hits = Counter(
            "jax_infer:prefix_cache_hits",
            "Prompt tokens found in the prefix cache.",
            registry=registry,
        )
        self.spec_decode_num_draft_tokens = Counter(
            "jax_infer:spec_decode_num_draft_tokens",
            "Draft tokens proposed for verification (speculative decoding).",
            registry=registry,
        )
        self.spec_decode_num_accepted_tokens = Counter(
            "jax_infer:spec_decode_num_accepted_tokens",
            "Draft tokens accepted by verification (speculative decoding).",
            registry=registry,
        )
        self.num_compiles = Counter(
            "jax_infer:num_compiles",
            "XLA backend compiles in the server process (jax.monitoring).",
            registry=registry,
        )
