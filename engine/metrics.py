"""Prometheus metrics of one engine (its own registry, so several apps in one process don't clash)."""

from __future__ import annotations

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector,
                               ProcessCollector, generate_latest)
from prometheus_client.core import GaugeMetricFamily

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
        self.embedding_tokens = Counter("ai_engine_embedding_tokens", "Input tokens read for embeddings", registry=r)
        self.embedding_inputs = Counter("ai_engine_embedding_inputs", "Texts (or token lists) embedded", registry=r)
        self.generated_tokens = Counter("ai_engine_generated_tokens", "Generated tokens (counted as they come)",
                                        registry=r)
        self.tokens_per_second = Histogram("ai_engine_decode_tokens_per_second",
                                           "Decode speed of each generation", buckets=RATE_BUCKETS, registry=r)
        self.queue_depth = Gauge("ai_engine_queue_depth", "Requests waiting for the model", registry=r)
        self.rejections = Counter("ai_engine_queue_rejections", "Requests refused with 503 (queue full)", registry=r)
        self.deadline_rejections = Counter("ai_engine_deadline_rejections",
                                           "Requests refused with 503 at once: estimated to finish after their deadline",
                                           registry=r)
        self.timeouts = Counter("ai_engine_request_timeouts", "Requests past REQUEST_TIMEOUT_S", registry=r)
        self.cache_hits = Counter("ai_engine_cache_hits", "Cache hits", ["cache"], registry=r)
        self.background_tokens = Counter("ai_engine_background_read_tokens",
                                         "Prompt tokens of refused requests read while the model was idle",
                                         registry=r)
        self.model_loads = Counter("ai_engine_model_loads", "Models loaded (start-up, /load-model, on demand)",
                                   registry=r)
        for cache in ("conversation", "response", "shared-prefix"):
            self.cache_hits.labels(cache=cache)

    def bind_models(self, manager) -> None:
        """Per-model gauges, read from `manager` at each scrape: which models are resident, their
        memory, load time, requests and queue (a scheduler's own `queue_depth.set` is overridden)."""
        self.registry.register(_ModelsCollector(manager))
        self.queue_depth.set_function(lambda: sum(m.engine.waiting for m in manager.resident()))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _ModelsCollector:
    """The resident models, as gauges labelled by model name."""

    def __init__(self, manager) -> None:
        self.manager = manager

    def describe(self):
        return []

    def collect(self):
        from engine.gguf_info import quantization_name

        manager = self.manager
        models = manager.resident()
        default = manager.default
        loaded = GaugeMetricFamily("ai_engine_model_loaded", "1 when the default model is loaded and ready")
        loaded.add_metric([], 1 if default is not None and manager.ready else 0)
        count = GaugeMetricFamily("ai_engine_models_loaded", "Resident models")
        count.add_metric([], len(models))
        info = GaugeMetricFamily("ai_engine_model_info", "A resident model (value 1)",
                                 labels=["name", "quantization", "gpu_layers"])
        per_model = {key: GaugeMetricFamily(f"ai_engine_model_{key}", text, labels=["name"]) for key, text in (
            ("load_seconds", "Time the model took to load"),
            ("memory_bytes", "Planned RAM of the model: weights, KV cache, buffers, conversation cache"),
            ("vram_bytes", "Planned VRAM of the model"),
            ("active_requests", "Requests the model is generating"),
            ("queue_depth", "Requests waiting for one of the model's sequence slots"),
            ("background_reads", "Refused prompts' prefixes waiting to be read while the model is idle"),
            ("expires_in_seconds", "Seconds until the idle model unloads (-1: it stays)"))}
        for m in models:
            try:
                file_type = int(m.metadata.get("general.file_type", ""))
            except ValueError:
                file_type = None
            info.add_metric([m.name, quantization_name(file_type), str(m.gpu_layers)], 1)
            expires = m.expires_in_s
            for key, value in (("load_seconds", m.load_seconds), ("memory_bytes", m.ram_bytes),
                               ("vram_bytes", m.vram_bytes), ("active_requests", m.engine.active),
                               ("queue_depth", m.engine.waiting),
                               ("background_reads", getattr(m.engine, "background_reads", 0)),
                               ("expires_in_seconds", -1 if expires is None else expires)):
                per_model[key].add_metric([m.name], value)
        yield from (loaded, count, info, *per_model.values())
