"""Prometheus metrics of one server process (its own registry, so tests can run several apps), with the
process's own collectors (memory, CPU, open files: `process_*`; the Python runtime: `python_*`)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=r)
        self.requests = Counter("hndsr_requests_total", "HTTP requests by route, status and the model version that "
                                "answered (499: the client went away before the answer; 408: its upload stalled)",
                                ["route", "status", "version"], registry=r)
        self.latency = Histogram("hndsr_request_seconds", "HTTP request latency by route and model version",
                                 ["route", "version"], registry=r,
                                 buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.canary_weight = Gauge("hndsr_canary_weight", "share of clients routed to the roll-out's candidate now "
                                   "(0 when none is loaded or it was backed out)", registry=r)
        self.canary_backouts = Counter("hndsr_canary_backouts_total", "candidates backed out of a roll-out",
                                       ["version"], registry=r)
        self.shadow = Counter("hndsr_shadow_requests_total", "shadow runs of production requests on the roll-out "
                              "candidate, by outcome (compared; dropped: the engine was busy or a shadow run was "
                              "in flight; preempted: client work arrived; skipped: the candidate takes other bands or scales; "
                              "failed)", ["candidate", "outcome"],
                              registry=r)
        self.shadow_psnr = Histogram("hndsr_shadow_psnr_db", "PSNR between the production answer and the "
                                     "candidate's output for the same request (model values in [0, 1])",
                                     ["production", "candidate"], registry=r,
                                     buckets=(10, 15, 20, 25, 30, 35, 40, 45, 50, 60, 80))
        self.shadow_seconds = Histogram("hndsr_shadow_seconds", "the candidate's queue + inference time on shadow "
                                        "runs", ["candidate"], registry=r,
                                        buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.canary_retries = Counter("hndsr_canary_retries_total", "candidate requests that failed and were "
                                      "answered by production instead", ["version"], registry=r)
        stages = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.queue_wait = Histogram("hndsr_queue_seconds", "time a super-resolve request waited in the engine's queue "
                                    "before its first tile ran", registry=r, buckets=(0.001, 0.005, *stages))
        self.inference = Histogram("hndsr_inference_seconds", "time from a request's first tile starting to its "
                                   "output being ready (the model's work, without queueing, decoding or encoding)",
                                   registry=r, buckets=stages)
        self.queue_tiles = Gauge("hndsr_queue_tiles", "tiles waiting for or in inference", registry=r)
        self.queue_pixels = Gauge("hndsr_queue_output_pixels", "output pixels admitted and not yet done", registry=r)
        self.queue_capacity = Gauge("hndsr_queue_capacity_output_pixels", "output pixels the engine admits at once "
                                    "(HNDSR_MAX_QUEUE_PIXELS); beyond, requests get 503", registry=r)
        self.ready = Gauge("hndsr_ready", "1 while a model is loaded and warm and the server is not draining "
                           "(what /readyz answers 200 to), else 0", registry=r)
        self.images = Counter("hndsr_images_total", "images super-resolved", registry=r)
        self.pixels = Counter("hndsr_output_pixels_total", "output pixels produced", registry=r)
        self.rejections = Counter("hndsr_rejections_total", "requests refused, by reason", ["reason"], registry=r)
        self.client_timeouts = Counter("hndsr_client_timeouts_total", "connections closed because the client "
                                       "stalled (headers not complete in time, or a pause in the body upload)",
                                       ["phase"], registry=r)
        self.client_requests = Counter("hndsr_client_requests_total", "super-resolve and model requests by named "
                                       "client (HNDSR_API_KEYS_FILE) and status", ["client", "status"], registry=r)
        self.client_pixels = Counter("hndsr_client_output_pixels_total", "output pixels produced per named client",
                                     ["client"], registry=r)
        self.reloads = Counter("hndsr_model_reloads_total", "hot reloads of the model by outcome (loaded; refused: "
                               "its weights fail the integrity check; failed: any other reason)", ["outcome"],
                               registry=r)
        self.integrity_failures = Counter("hndsr_model_integrity_failures_total", "versions refused because a weight "
                                          "file is not the one registered (artifact store altered)", ["version"],
                                          registry=r)
        self.registry_errors = Counter("hndsr_registry_errors_total", "polls that could not read the registry "
                                       "(unreachable, database locked); nothing is reloaded then", registry=r)
        self.batch_size = Histogram("hndsr_batch_tiles", "tiles per forward pass", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32))
        # Label-free quality and input drift (hndsr.monitoring, serving/drift.py)
        self.consistency = Histogram("hndsr_consistency_psnr_db", "each answer shrunk back by the degradation "
                                     "function against its own input: PSNR in dB (model units, valid pixels); lower "
                                     "means the answer agrees less with what it was given", ["version"], registry=r,
                                     buckets=(20, 25, 30, 32, 34, 36, 38, 40, 42, 44, 46, 50, 60, 80))
        self.consistency_shift = Histogram("hndsr_consistency_shift_px", "displacement between an answer shrunk "
                                           "back and its input (LR pixels, phase correlation; inputs of 16+ px)",
                                           ["version"], registry=r, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4))
        self.consistency_reference = Gauge("hndsr_consistency_reference_psnr_db", "the version's own consistency "
                                           "on its validation split (quantiles 0.05, 0.5, 0.95 of the tiles), the "
                                           "reference live answers are compared with", ["version", "quantile"],
                                           registry=r)
        self.in_range = Histogram("hndsr_input_in_range_ratio", "share of an input's valid pixels whose every band "
                                  "lies in the training range (0.1-99.9th percentiles of the training split)",
                                  ["version", "client"], registry=r,
                                  buckets=(0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.999, 1))
        self.nodata = Histogram("hndsr_input_nodata_ratio", "share of an input's pixels that are nodata (masked or "
                                "the nodata value)", ["version", "client"], registry=r,
                                buckets=(0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.9, 1))
        self.psi = Gauge("hndsr_input_psi", "population stability index of the inputs in the drift window "
                         "(HNDSR_DRIFT_WINDOW_S, at most HNDSR_DRIFT_WINDOW_REQUESTS) against the version's training "
                         "split, per band: < 0.1 stable, 0.1-0.25 moderate, > 0.25 large shift",
                         ["version", "client", "band"], registry=r)
        self.psi_requests = Gauge("hndsr_input_psi_window_requests", "requests in the drift window behind "
                                  "hndsr_input_psi", ["version", "client"], registry=r)
        self.model = Gauge("hndsr_model_info", "the model being served (value 1), with the arithmetic it runs in",
                           ["version", "alias", "source", "precision", "compiled"], registry=r)

    def set_model(self, info: dict) -> None:
        self.model.clear()
        inference = info.get("inference", {})
        self.model.labels(version=str(info.get("version")), alias=str(info.get("alias") or ""),
                          source=str(info.get("source")), precision=inference.get("precision", "float32"),
                          compiled=str(inference.get("compiled", False)).lower()).set(1)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
