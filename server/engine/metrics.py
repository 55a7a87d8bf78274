"""Prometheus metrics, names and labels as in docs/api.md, in a registry owned by one app."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# No `<name>_created` gauge beside every counter and histogram series: they are not in the contract, and
# they doubled the series a scrape carries (one per label set).
disable_created_metrics()

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 50, 64, 100, 128, 150, 197, 256, 400, 577, 1024, 2048)
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
GFLOPS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 12, 17.6, 25, 50, 100, 200)


class LabelCache:
    """`metric.labels(*values)`, remembered per label values: prometheus_client's `labels` checks and converts
    every value and takes a lock on each call, which the hot request path pays several times per request.
    A child is still created on first use only (a series appears in /metrics when first observed); do not
    use it for a metric whose series are removed (`clear`, `remove`)."""

    __slots__ = ("children", "metric")

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = self.metric.labels(*values)
        return child


class Metrics:
    """Every metric of one server; a fresh registry so that several apps can live in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        mve = ("model", "variant", "experiment")
        mvd = ("model", "variant", "device")
        shadow = ("model", "experiment", "variant", "reference")
        self.request_duration = Histogram(
            "mame_request_duration_seconds", "Time from request arrival to answer",
            mve, buckets=LATENCY_BUCKETS, registry=r)
        self.successful_request_duration = Histogram(
            "mame_successful_request_duration_seconds", "Time from request arrival to a successful answer",
            mve, buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            "mame_queue_wait_seconds", "Time an image waited in its variant queue",
            mve, buckets=LATENCY_BUCKETS, registry=r)
        self.batch_inference = Histogram(
            "mame_batch_inference_seconds", "Time of one batch forward pass on a device",
            mvd, buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "mame_batch_size", "Images per batch", mvd, buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.requests = Counter(
            "mame_requests", "Classify requests by HTTP status", (*mve, "status"), registry=r)
        self.images = Counter(
            "mame_images", "Images by HTTP status", (*mve, "status"), registry=r)
        self.explain_requests = Counter(
            "mame_explain_requests", "Explain requests by HTTP status", ("model", "variant", "status"),
            registry=r)
        self.explain_duration = Histogram(
            "mame_explain_duration_seconds", "Time from explain request arrival to answer",
            ("model", "variant"), buckets=LATENCY_BUCKETS, registry=r)
        self.final_tokens = Histogram(
            "mame_final_tokens", "Tokens left after the last block", mve, buckets=TOKEN_BUCKETS, registry=r)
        self.gflops = Histogram(
            "mame_gflops", "Estimated GFLOPs per image", mve, buckets=GFLOPS_BUCKETS, registry=r)
        self.queue_depth = Gauge(
            "mame_queue_depth", "Images waiting in a variant queue", ("model", "variant"), registry=r)
        self.in_flight = Gauge(
            "mame_in_flight_requests", "Requests being handled", ("model", "variant"), registry=r)
        # A/B experiments (server/experiments/, docs/ab_testing.md).
        self.shadow_comparisons = Counter(
            "mame_shadow_comparisons", "Shadow comparisons against a reference variant", shadow, registry=r)
        self.shadow_agreements = Counter(
            "mame_shadow_agreements", "Shadow comparisons whose top-1 agreed", shadow, registry=r)
        self.shadow_top1_prob_abs_diff = Counter(
            "mame_shadow_top1_prob_abs_diff", "Sum of |top-1 probability difference|", shadow, registry=r)
        self.shadow_dropped = Counter(
            "mame_shadow_dropped", "Shadow runs (images) dropped: shadow queue full, expired or shutdown",
            shadow, registry=r)
        self.experiment_weight = Gauge(
            "mame_experiment_weight", "Traffic share of a variant in an experiment",
            ("experiment", "variant"), registry=r)
        self.experiment_split_version = Gauge(
            "mame_experiment_split_version",
            "Version of an experiment's split in force (the fleet's split store's, when it sets the split)",
            ("experiment",), registry=r)
        # True labels posted after the answer (POST /v1/labels); names as abtest.judge.METRICS reads them.
        self.labelled_images = Counter(
            "mame_labelled_images", "Answered images whose true label was posted", mve, registry=r)
        self.label_top1_correct = Counter(
            "mame_label_top1_correct", "Labelled images whose top-1 was the label", mve, registry=r)
        self.label_top5_correct = Counter(
            "mame_label_top5_correct", "Labelled images with the label among the top 5", mve, registry=r)
        self.event_loop_lag = Histogram(
            "mame_event_loop_lag_seconds", "How late the event loop's heartbeat woke up (every 0.5 s)",
            buckets=LAG_BUCKETS, registry=r)
        self.model_info = Gauge(
            "mame_model_info", "Loaded models (value 1)", ("model", "arch", "weights", "device", "dtype"),
            registry=r)
        # The per-request series, labelled children cached (experiment_weight is cleared: never cached).
        self.request_duration_of = LabelCache(self.request_duration)
        self.successful_request_duration_of = LabelCache(self.successful_request_duration)
        self.queue_wait_of = LabelCache(self.queue_wait)
        self.requests_of = LabelCache(self.requests)
        self.images_of = LabelCache(self.images)
        self.final_tokens_of = LabelCache(self.final_tokens)
        self.gflops_of = LabelCache(self.gflops)
        self.in_flight_of = LabelCache(self.in_flight)
        self.batch_inference_of = LabelCache(self.batch_inference)  # per batch, from a worker's thread
        self.batch_size_of = LabelCache(self.batch_size)
        self.explain_requests_of = LabelCache(self.explain_requests)
        self.explain_duration_of = LabelCache(self.explain_duration)
        self.shadow_comparisons_of = LabelCache(self.shadow_comparisons)
        self.shadow_agreements_of = LabelCache(self.shadow_agreements)
        self.shadow_top1_prob_abs_diff_of = LabelCache(self.shadow_top1_prob_abs_diff)
        self.shadow_dropped_of = LabelCache(self.shadow_dropped)
