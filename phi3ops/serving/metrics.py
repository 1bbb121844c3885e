"""What `phi3ops serve` shows Prometheus at ``GET /metrics``.

One `ServingMetrics` per app, on a registry of its own (never prometheus_client's global one,
so two apps in one process, as in tests, keep apart). What it counts:

- every HTTP request the server answers, by route and status (``phi3ops_http_requests_total``:
  probes, ``/metrics`` itself, 401s and 404s included);
- every inference call (``/invocations``, ``/v1/chat/completions``, and the shadow copies the
  candidate answers into its records), by route, status, outcome (`records.OUTCOMES`), arm and
  version (``phi3ops_requests_total``), with its duration, its rows' prompt and completion
  tokens, and, for streamed answers, the time to the first token and between tokens;
- gauges read when scraped: the readiness of this worker, the answering models' batcher
  (``queue_depth``, ``running_rows``, ``last_batch_size`` from the ONNX model's
  ``load_stats()``, when it has one) and the inference records waiting in the spool.

Several workers (``phi3ops serve --workers N``): each worker has its own counters, so the
command sets ``PROMETHEUS_MULTIPROC_DIR`` to a fresh folder for its workers, and every worker
answers ``/metrics`` with all of them added up (prometheus_client's multiprocess mode);
gauges then add up the live workers' batchers (``livesum``) and the spool's backlog is the
largest any worker saw (it is one folder for every server on the data dir).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from phi3ops.serving.records import CANCELLED_STATUS, answer_usage, outcome_of, sse_chunks
from phi3ops.serving.request import parse_json

_log = logging.getLogger(__name__)

#: prometheus_client's variable for the folder its multiprocess mode shares between workers.
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST
#: Batcher figures exported from ``load_stats()``, each a gauge ``phi3ops_<key>``.
LOAD_STATS = {
    "queue_depth": "Requests waiting in the model's batcher queue.",
    "running_rows": "Rows the model's batcher is generating now.",
    "last_batch_size": "Rows in the model's last generated batch.",
    "kv_reserved_bytes": "KV-cache bytes the model's running batch holds of the budget "
    "(summed over arms: what the shared budget holds).",
    "kv_budget_bytes": "The KV-cache budget batches are admitted against, shared by both arms "
    "(each arm reports the same budget: do not sum it).",
}
#: Seconds: a token is a few milliseconds on a GPU, a second on a small CPU.
_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_CALL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
#: Routes named by themselves in ``phi3ops_http_requests_total``; any other path is "other",
#: so a scan of random paths cannot grow the label set.
KNOWN_ROUTES = frozenset(
    {
        "/invocations",
        "/v1/chat/completions",
        "/v1/models",
        "/ping",
        "/health",
        "/ready",
        "/metrics",
        "/version",
    }
)


def route_label(path: str) -> str:
    """``path`` as a label: a known route, ``/v1/models/{id}``, or ``other``."""
    if path in KNOWN_ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    return "other"


class ServingMetrics:
    """The counters, histograms and gauges of one served app (see the module docstring).

    Args:
        readiness: This worker's state now (``loading``, ``ready``, ``draining``...).
        models: The loaded models now, as (arm, version, pyfunc), read at each scrape.
        spool_backlog: (records waiting, age of the oldest in seconds or None) of the spool,
            or None when the server does not record; read at each scrape.
    """

    def __init__(
        self,
        *,
        readiness: Callable[[], str] = lambda: "ready",
        models: Callable[[], Iterable[tuple[str, str, Any]]] = lambda: (),
        spool_backlog: Callable[[], tuple[int, float | None] | None] = lambda: None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess_dir = os.environ.get(MULTIPROC_DIR_ENV) or None
        self._readiness = readiness
        self._models = models
        self._spool_backlog = spool_backlog
        r = self.registry
        self.http_requests = Counter(
            "phi3ops_http_requests",
            "HTTP requests answered, by route and status.",
            ["route", "status"],
            registry=r,
        )
        self.requests = Counter(
            "phi3ops_requests",
            "Inference calls, by route, status, outcome, arm and version (shadow copies too).",
            ["route", "status", "outcome", "arm", "version", "shadow"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "phi3ops_request_duration_seconds",
            "Wall time of an inference call, from its first byte to its last.",
            ["route", "outcome", "arm"],
            buckets=_CALL_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "phi3ops_prompt_tokens",
            "Prompt tokens of the answered rows.",
            ["arm", "version"],
            registry=r,
        )
        self.completion_tokens = Counter(
            "phi3ops_completion_tokens",
            "Completion tokens of the answered rows.",
            ["arm", "version"],
            registry=r,
        )
        self.ttft = Histogram(
            "phi3ops_time_to_first_token_seconds",
            "Streamed answers: seconds from the request to its first text sent.",
            ["arm", "version"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "phi3ops_inter_token_latency_seconds",
            "Streamed answers: seconds between consecutive text chunks sent (one per token).",
            ["arm", "version"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.ready = Gauge(
            "phi3ops_ready",
            "1 when this server takes traffic (GET /ready is 200).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.load_stats = {
            key: Gauge(
                f"phi3ops_{key}", text, ["arm", "version"], registry=r, multiprocess_mode="livesum"
            )
            for key, text in LOAD_STATS.items()
        }
        self.records_waiting = Gauge(
            "phi3ops_records_waiting",
            "Inference records spooled and not yet stored (every server on this data dir).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.oldest_record_age = Gauge(
            "phi3ops_oldest_record_age_seconds",
            "Age of the oldest record waiting in the spool (0 when none waits).",
            registry=r,
            multiprocess_mode="livemax",
        )

    # --- observing ------------------------------------------------------------------------

    def observe_http(self, path: str, status: int) -> None:
        """One HTTP request answered with ``status``."""
        self.http_requests.labels(route_label(path), str(status)).inc()

    def observe_call(self, exchange: Any, *, route: str, version: str | None) -> None:
        """One inference call, from its `phi3ops.serving.exchange.Exchange` once it ended;
        never raises (serving must not fail because counting does).
        """
        try:
            self._observe_call(exchange, route=route, version=version or "")
        except Exception:
            _log.exception("Could not count a call in the metrics")

    def _observe_call(self, exchange: Any, *, route: str, version: str) -> None:
        status = exchange.status
        if exchange.timed_out:
            status = 504
        elif exchange.gone.is_set():
            status = CANCELLED_STATUS
        outcome = outcome_of(status)
        arm = exchange.arm
        shadow = "true" if exchange.shadow else "false"
        self.requests.labels(route, str(status), outcome, arm, version, shadow).inc()
        self.request_seconds.labels(route, outcome, arm).observe(exchange.elapsed())
        if status >= 400:
            return
        rows = 1
        if exchange.request is not None and exchange.request.rows:
            rows = len(exchange.request.rows)
        if exchange.streamed:
            times, usage = stream_facts(exchange.parts)
            answer = {"usage": usage or exchange.usage or {}}
            if times:
                self.ttft.labels(arm, version).observe(times[0])
            histogram = self.inter_token.labels(arm, version)
            for before, after in itertools.pairwise(times):
                histogram.observe(after - before)
        else:
            answer, _ = parse_json(b"".join(data for _, data in exchange.parts))
        prompt, completion = answer_usage(answer, rows)
        if prompt:
            self.prompt_tokens.labels(arm, version).inc(prompt)
        if completion:
            self.completion_tokens.labels(arm, version).inc(completion)
        self.refresh_batchers()

    # --- scraping -------------------------------------------------------------------------

    def refresh_batchers(self) -> None:
        """Sets the batcher gauges from each loaded model's ``load_stats()`` (a model without
        it, MLflow's transformers flavor, has none).
        """
        for arm, version, model in self._models():
            stats = _load_stats(model)
            for key, gauge in self.load_stats.items():
                value = stats.get(key)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    gauge.labels(arm, version).set(value)

    def render(self) -> tuple[bytes, str]:
        """The exposition (body, content type) of every metric, the gauges read now."""
        self.ready.set(1 if self._readiness() == "ready" else 0)
        try:
            self.refresh_batchers()
            backlog = self._spool_backlog()
            if backlog is not None:
                waiting, age = backlog
                self.records_waiting.set(waiting)
                self.oldest_record_age.set(age or 0.0)
        except Exception:
            _log.exception("Could not read the gauges for /metrics")
        registry = self.registry
        if self.multiprocess_dir is not None:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
        return generate_latest(registry), METRICS_CONTENT_TYPE

    def close(self) -> None:
        """This worker stops: its live gauges leave the sum of a multiprocess scrape."""
        if self.multiprocess_dir is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid(), path=self.multiprocess_dir)


def _load_stats(model: Any) -> dict[str, Any]:
    """``load_stats()`` of the python model inside an MLflow pyfunc, or of ``model`` itself."""
    inner = model
    unwrap = getattr(model, "unwrap_python_model", None)
    if callable(unwrap):
        try:
            inner = unwrap()
        except Exception:  # not a python model (the transformers flavor)
            return {}
    stats = getattr(inner, "load_stats", None)
    if not callable(stats):
        return {}
    value = stats()
    return value if isinstance(value, dict) else {}


def stream_facts(events: list[tuple[float, bytes]]) -> tuple[list[float], dict[str, Any]]:
    """Of a stream's server-sent events, each with the second it was sent: the seconds at which
    each event with answer text (or a tool call's) was sent, and the stream's last ``usage``.
    """
    times: list[float] = []
    usage: dict[str, Any] = {}
    for sent, chunk in sse_chunks(events):
        if isinstance(chunk.get("usage"), dict):
            usage = chunk["usage"]
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            continue
        if any(
            isinstance(c, dict)
            and isinstance(c.get("delta"), dict)
            and (c["delta"].get("content") or c["delta"].get("tool_calls"))
            for c in choices
        ):
            times.append(sent)
    return times, usage
