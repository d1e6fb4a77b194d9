"""Prometheus metrics, correct across gunicorn workers (multiprocess mode).

``PROMETHEUS_MULTIPROC_DIR`` must be set before this module is imported when
several workers serve; the server does that before it loads the app.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest, multiprocess

from webhook.admission import ReviewResult

ADMISSIONS = Counter("nix_flake_webhook_admissions_total", "AdmissionReviews answered, by outcome", ["outcome"])
LATENCY = Histogram(
    "nix_flake_webhook_admission_seconds",
    "Time to answer one AdmissionReview, in the worker",
    buckets=(0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
REWRITES = Counter("nix_flake_webhook_rewrites_total", "Container images rewritten, by flake protocol", ["protocol"])
DENIALS = Counter("nix_flake_webhook_denials_total", "Pods refused, by reason", ["reason"])


@cache
def _child(metric: Counter, label: str) -> Any:
    # labels() validates and looks up on every call; the label values are a handful of words.
    return metric.labels(label)


def record(result: ReviewResult, seconds: float) -> None:
    """Count one answered review."""
    _child(ADMISSIONS, result.outcome).inc()
    LATENCY.observe(seconds)
    for protocol in result.protocols:
        _child(REWRITES, protocol).inc()
    if result.outcome == "denied":
        _child(DENIALS, result.reason).inc()


def exposition() -> tuple[bytes, str]:
    """The metrics page: merged over all workers when running multiprocess."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    """Drop a dead worker's live gauges (gunicorn child_exit hook)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
