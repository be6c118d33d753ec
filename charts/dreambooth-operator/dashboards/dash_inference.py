"""The inference dashboard: the sampling servers."""

from __future__ import annotations

from dash_model import (
    SERVE_ADAPTER_EVICTIONS,
    SERVE_ADAPTER_HITS,
    SERVE_ADAPTER_LOAD_SECONDS,
    SERVE_ADAPTER_LOADS,
    SERVE_BATCH,
    SERVE_BATCH_REQUESTS,
    SERVE_GPU_MEMORY,
    SERVE_IMAGES,
    SERVE_INFLIGHT,
    SERVE_LATENCY,
    SERVE_QUEUE,
    SERVE_READY,
    SERVE_REQUESTS,
    P,
    Q,
    Row,
    Spec,
    Variable,
    hist_q,
)

# ---------------------------------------------------------------------------------------------------------------
# inference
SRV = 'namespace=~"$namespace", pod=~"$pod"'
INFERENCE = Spec(
    name="inference",
    uid="dreambooth-inference",
    title="DreamBooth / Inference",
    description="The sampling servers of InferenceServices: traffic, latency, batching, queueing, errors, subject "
    "(LoRA adapter) loads and hits, GPU memory.",
    variables=[
        Variable("namespace", "Namespace", f"label_values({SERVE_READY}, namespace)", multi=True),
        Variable("pod", "Pod", f'label_values({SERVE_READY}{{namespace=~"$namespace"}}, pod)', multi=True),
    ],
    rows=[
        Row(
            "Traffic",
            [
                P(
                    "timeseries",
                    "Request rate by code",
                    "Generate requests per second by HTTP status code (200 ok, 400 out of limits, 401, 413, 429 "
                    "queue full, 500 generation failed, 503 loading, draining or out of GPU memory).",
                    "reqps",
                    [Q(f"sum by (code) (rate({SERVE_REQUESTS}{{{SRV}}}[$__rate_interval]))", "{{code}}")],
                    stacked=True,
                ),
                P(
                    "timeseries",
                    "Latency p50, p95, p99",
                    "Time to answer a generate request, queueing included.",
                    "s",
                    [
                        Q(hist_q(0.5, SERVE_LATENCY, "", SRV), "p50"),
                        Q(hist_q(0.95, SERVE_LATENCY, "", SRV), "p95"),
                        Q(hist_q(0.99, SERVE_LATENCY, "", SRV), "p99"),
                    ],
                ),
                P(
                    "timeseries",
                    "Errors",
                    "Share of requests answered with a 5xx (the alert DreamBoothServingErrors fires over 5%), and "
                    "429s (queue full: backpressure, scale out).",
                    "percentunit",
                    [
                        Q(
                            f'(sum(rate({SERVE_REQUESTS}{{{SRV}, code=~"5.."}}[$__rate_interval])) or vector(0)) / '
                            f"sum(rate({SERVE_REQUESTS}{{{SRV}}}[$__rate_interval]))",
                            "5xx",
                        ),
                        Q(
                            f'(sum(rate({SERVE_REQUESTS}{{{SRV}, code="429"}}[$__rate_interval])) or vector(0)) / '
                            f"sum(rate({SERVE_REQUESTS}{{{SRV}}}[$__rate_interval]))",
                            "429",
                        ),
                    ],
                ),
                P(
                    "timeseries",
                    "Images generated",
                    "Images generated per second.",
                    "suffix: images/s",
                    [Q(f"sum(rate({SERVE_IMAGES}{{{SRV}}}[$__rate_interval]))", "images/s")],
                ),
            ],
        ),
        Row(
            "Batching and queueing",
            [
                P(
                    "timeseries",
                    "Batch size",
                    "Dynamic batching: images per pipeline call (mean and p95) and requests per pipeline call "
                    "(mean). Concurrent compatible requests share a call up to spec.server.maxBatchSize.",
                    "short",
                    [
                        Q(
                            f"sum(rate({SERVE_BATCH}_sum{{{SRV}}}[$__rate_interval])) / "
                            f"sum(rate({SERVE_BATCH}_count{{{SRV}}}[$__rate_interval]))",
                            "images per call (mean)",
                        ),
                        Q(hist_q(0.95, SERVE_BATCH, "", SRV), "images per call (p95)"),
                        Q(
                            f"sum(rate({SERVE_BATCH_REQUESTS}_sum{{{SRV}}}[$__rate_interval])) / "
                            f"sum(rate({SERVE_BATCH_REQUESTS}_count{{{SRV}}}[$__rate_interval]))",
                            "requests per call (mean)",
                        ),
                    ],
                    w=8,
                ),
                P(
                    "timeseries",
                    "Queue depth and in flight",
                    "Requests waiting in each pod's queue, and requests being answered or waiting (the gauge the "
                    "HorizontalPodAutoscaler reads).",
                    "short",
                    [
                        Q(f"sum by (pod) ({SERVE_QUEUE}{{{SRV}}})", "queued {{pod}}"),
                        Q(f"sum by (pod) ({SERVE_INFLIGHT}{{{SRV}}})", "in flight {{pod}}"),
                    ],
                    w=8,
                ),
                P(
                    "stat",
                    "Ready replicas",
                    "Serving pods with their model loaded and answering.",
                    "short",
                    [Q(f"sum({SERVE_READY}{{{SRV}}})", "ready", instant=True)],
                    w=8,
                ),
            ],
        ),
        Row(
            "Subjects (adapters) and GPU",
            [
                P(
                    "timeseries",
                    "Adapter loads, hits, evictions",
                    "LoRA subjects loaded from object storage (cold loads), batches whose subject was already "
                    "loaded (hits) and subjects evicted from the LRU, per second.",
                    "ops",
                    [
                        Q(f"sum(rate({SERVE_ADAPTER_LOADS}{{{SRV}}}[$__rate_interval]))", "loads"),
                        Q(f"sum(rate({SERVE_ADAPTER_HITS}{{{SRV}}}[$__rate_interval]))", "hits"),
                        Q(f"sum(rate({SERVE_ADAPTER_EVICTIONS}{{{SRV}}}[$__rate_interval]))", "evictions"),
                    ],
                    w=6,
                ),
                P(
                    "timeseries",
                    "Adapter hit ratio",
                    "Batches whose subject was already loaded, of the batches plus cold loads.",
                    "percentunit",
                    [
                        Q(
                            f"sum(rate({SERVE_ADAPTER_HITS}{{{SRV}}}[$__rate_interval])) / "
                            f"(sum(rate({SERVE_ADAPTER_HITS}{{{SRV}}}[$__rate_interval])) + "
                            f"sum(rate({SERVE_ADAPTER_LOADS}{{{SRV}}}[$__rate_interval])))",
                            "hit ratio",
                        )
                    ],
                    w=6,
                ),
                P(
                    "timeseries",
                    "Adapter load time",
                    "Time to load one subject (download and apply), p50 and p95.",
                    "s",
                    [
                        Q(hist_q(0.5, SERVE_ADAPTER_LOAD_SECONDS, "", SRV), "p50"),
                        Q(hist_q(0.95, SERVE_ADAPTER_LOAD_SECONDS, "", SRV), "p95"),
                    ],
                    w=6,
                ),
                P(
                    "timeseries",
                    "GPU memory",
                    "CUDA memory allocated by each serving pod (0 on CPU).",
                    "bytes",
                    [Q(f"max by (pod) ({SERVE_GPU_MEMORY}{{{SRV}}})", "{{pod}}")],
                    w=6,
                ),
            ],
        ),
    ],
)
