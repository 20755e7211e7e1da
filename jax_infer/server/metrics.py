"""Prometheus metrics of one server, in vLLM's names under the `jax_infer:` prefix.

Each app has its own CollectorRegistry (not prometheus-client's global one), so several
servers, or a test's apps, in one process do not share or collide on metrics.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
