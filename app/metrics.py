"""Prometheus metrics of one server instance (its own registry, so apps never clash)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_TIME_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.queue_depth = Gauge("craftserve_queue_depth", "Jobs waiting in the queue", registry=r)
        self.queue_wait = Histogram(
            "craftserve_queue_wait_seconds", "Time jobs waited before a worker took them",
            buckets=_TIME_BUCKETS, registry=r,
        )
        self.generation = Histogram(
            "craftserve_generation_seconds", "Pipeline time per batch",
            ["model"], buckets=_TIME_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "craftserve_batch_size", "Images per pipeline call",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16), registry=r,
        )
        self.images = Counter(
            "craftserve_images_total", "Images generated", ["model", "sampler"], registry=r
        )
        self.errors = Counter(
            "craftserve_errors_total", "Requests answered with an error", ["kind"], registry=r
        )
        self.rate_limited = Counter(
            "craftserve_rate_limited_total", "Requests refused past their key's rate limit",
            ["key"], registry=r,  # the key's label (key-<hash>, anonymous-<address>), never the key
        )
        self.model_load = Histogram(
            "craftserve_model_load_seconds", "Time to load a model", ["model"],
            buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 120, 300), registry=r,
        )
        self.device_memory = Gauge(
            "craftserve_device_memory_bytes", "Memory allocated on the device", ["device"],
            registry=r,
        )
        self.workers_ready = Gauge(
            "craftserve_workers_ready", "Workers running and past preload", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
