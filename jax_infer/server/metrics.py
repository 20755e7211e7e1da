"""Prometheus metrics of one server, in vLLM's names under the `jax_infer:` prefix.

Each app has its own CollectorRegistry (not prometheus-client's global one), so several
servers, or a test's apps, in one process do not share or collide on metrics. Counters the
engine keeps (prefix cache, speculative tokens, preemptions) and the process's XLA compile
counters (programs, persistent-cache hits, programs compiled, seconds: `compile_cache.stats`)
are copied in by the engine thread as increments (`AsyncEngine._publish`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from jax_infer import compile_cache


def num_compiles() -> int:
    """Programs jax asked the backend for in this process (compiled, or loaded from the
    persistent cache) since the counters started (`compile_cache.install_listeners`, called
    here: one jax.monitoring listener per process)."""
    compile_cache.install_listeners()
    return compile_cache.stats()["programs"]


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
            "Programs the server process asked XLA for: compiled, or loaded from the persistent "
            "compilation cache (jax.monitoring).",
            registry=registry,
        )
        # Cold start (compile_cache.py): what the persistent cache saved and what it did not.
        self.compile_cache_hits = Counter(
            "jax_infer:compile_cache_hits",
            "Programs loaded from the persistent compilation cache instead of compiled.",
            registry=registry,
        )
        self.num_programs_compiled = Counter(
            "jax_infer:num_programs_compiled",
            "Programs compiled by XLA in the server process (not found in the persistent cache).",
            registry=registry,
        )
        self.compile_seconds = Counter(
            "jax_infer:compile_seconds",
            "Seconds in XLA backend compiles, persistent-cache loads included.",
            registry=registry,
        )
        self.trace_seconds = Counter(
            "jax_infer:trace_seconds",
            "Seconds tracing and lowering to HLO (paid on every start: it is the cache key).",
            registry=registry,
        )
        self.precompile_seconds = Gauge(
            "jax_infer:precompile_seconds",
            "Seconds the start-up precompile of every step bucket took (0: not run).",
            registry=registry,
        )
        self.precompile_shapes = Gauge(
            "jax_infer:precompile_shapes",
            "Step shapes compiled at start-up (0: not run).",
            registry=registry,
        )
