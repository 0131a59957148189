"""Prometheus metrics of one engine (its own registry, so several apps in one process don't clash)."""

from __future__ import annotations

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector,
                               ProcessCollector, generate_latest)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30)
RATE_BUCKETS = (1, 2, 5, 10, 20, 30, 40, 50, 60, 80, 100, 150, 200)


class Metrics:
    """Every metric the engine exports at /metrics (names prefixed `ai_engine_`)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes, cpu seconds, open fds
        PlatformCollector(registry=r)
        self.requests = Counter("ai_engine_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("ai_engine_request_duration_seconds", "HTTP request duration",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("ai_engine_time_to_first_token_seconds",
                              "Request arrival to first generated token", buckets=TTFT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("ai_engine_prompt_tokens", "Prompt tokens of generation requests", registry=r)
        self.prompt_tokens_reused = Counter("ai_engine_prompt_tokens_reused",
                                            "Prompt tokens whose KV state was reused (context or cache)", registry=r)
        self.generated_tokens = Counter("ai_engine_generated_tokens", "Generated tokens (counted as they come)",
                                        registry=r)
        self.tokens_per_second = Histogram("ai_engine_decode_tokens_per_second",
                                           "Decode speed of each generation", buckets=RATE_BUCKETS, registry=r)
        self.queue_depth = Gauge("ai_engine_queue_depth", "Requests waiting for the model", registry=r)
        self.rejections = Counter("ai_engine_queue_rejections", "Requests refused with 503 (queue full)", registry=r)
        self.timeouts = Counter("ai_engine_request_timeouts", "Requests past REQUEST_TIMEOUT_S", registry=r)
        self.cache_hits = Counter("ai_engine_cache_hits", "Cache hits", ["cache"], registry=r)
        self.model_load_seconds = Gauge("ai_engine_model_load_seconds", "Time the current model took to load",
                                        registry=r)
        self.model_info = Gauge("ai_engine_model_info", "The loaded model (value 1)",
                                ["name", "quantization", "gpu_layers"], registry=r)
        self.model_loaded = Gauge("ai_engine_model_loaded", "1 when a model is loaded and ready", registry=r)
        for cache in ("conversation", "response"):
            self.cache_hits.labels(cache=cache)

    def set_model(self, name: str, quantization: str, gpu_layers: int, load_seconds: float) -> None:
        self.model_info.clear()
        self.model_info.labels(name=name, quantization=quantization, gpu_layers=str(gpu_layers)).set(1)
        self.model_load_seconds.set(load_seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
