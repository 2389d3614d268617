"""The service's own Prometheus metrics (on BentoML's /metrics) and the Server-Timing header.

Every request to an upload route (/classify, /classify_batch, /explain) is split into stages, each
observed in `vit_stage_seconds{stage=...}` and listed in the response's `Server-Timing` header:
    read        body read off the socket
    parse       multipart parsed and checked (http.py)
    decode      decode + resize + crop of the request's images (thread pool)
    queue       wait for the model in the batcher
    forward     the forward pass this request was part of
    serialize   the answer encoded as JSON
Label values are fixed sets, so the number of series stays bounded whatever clients send.
"""

from __future__ import annotations

import prometheus_client  # BentoML collects it across workers (its multiprocess directory is set first)

STAGES = ("read", "parse", "decode", "queue", "forward", "serialize")
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

stage_seconds = prometheus_client.Histogram(
    name="vit_stage_seconds",
    documentation="Seconds per request in each serving stage (see vit_service/serving/metrics.py)",
    labelnames=["stage"],
    buckets=_LATENCY_BUCKETS,
)
batch_size = prometheus_client.Histogram(
    name="vit_batch_size",
    documentation="Images per forward pass",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
images_total = prometheus_client.Counter(
    name="vit_images",
    documentation="Images received, by endpoint and outcome (ok, rejected, overloaded, error)",
    labelnames=["endpoint", "outcome"],
)
rejected_uploads_total = prometheus_client.Counter(
    name="vit_rejected_uploads",
    documentation="Requests refused with a 4xx, by reason",
    labelnames=["reason"],
)

auth_failures_total = prometheus_client.Counter(
    name="vit_auth_failures",
    documentation="Requests refused with 401, by reason (missing, malformed, invalid); never key material",
    labelnames=["reason"],
)


# Prediction drift (drift.py): each worker's recent window against the model's validation
# reference, labelled with the model tag; a gauge has no sample until the window can be judged.
# In BentoML's multiprocess mode the most recent value of a live worker is the one shown.
_DRIFT = {"labelnames": ["model"], "multiprocess_mode": "livemostrecent"}
drift_class_psi = prometheus_client.Gauge(
    "vit_drift_class_psi", "PSI of the predicted classes, recent window vs validation (< 0.1 stable, > 0.25 shifted)",
    **_DRIFT)
drift_score_psi = prometheus_client.Gauge(
    "vit_drift_top1_score_psi", "PSI of the top-1 score bins, recent window vs validation", **_DRIFT)
drift_mean_top1 = prometheus_client.Gauge(
    "vit_drift_top1_score_mean", "Mean top-1 score of the recent window (validation: /model_info)", **_DRIFT)
drift_low_confidence = prometheus_client.Gauge(
    "vit_drift_low_confidence_ratio", "Share of the recent window whose top-1 score is below the threshold", **_DRIFT)
drift_window = prometheus_client.Gauge(
    "vit_drift_window_predictions", "Predictions in the recent window (the drift gauges need 200)", **_DRIFT)


def observe_drift(model: str, count: int, gauges: dict[str, float] | None) -> None:
    drift_window.labels(model=model).set(count)
    if gauges is not None:
        drift_class_psi.labels(model=model).set(gauges["class_psi"])
        drift_score_psi.labels(model=model).set(gauges["score_psi"])
        drift_mean_top1.labels(model=model).set(gauges["mean_top1"])
        drift_low_confidence.labels(model=model).set(gauges["low_confidence_ratio"])


model_updates_total = prometheus_client.Counter(
    "vit_model_updates", "New model versions found in the store, by outcome (moved, refused)", labelnames=["outcome"])


def observe_stages(timings: dict[str, float]) -> None:
    for stage in STAGES:
        if stage in timings:
            stage_seconds.labels(stage=stage).observe(timings[stage])


def server_timing(timings: dict[str, float]) -> str:
    """`read;dur=0.12, parse;dur=0.30, ...` in milliseconds, stages in pipeline order."""
    return ", ".join(f"{stage};dur={timings[stage] * 1000:.2f}" for stage in STAGES if stage in timings)
