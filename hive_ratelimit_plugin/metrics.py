"""Prometheus metrics for a :class:`~hive_ratelimit_plugin.HiveLimiter` (extra ``prometheus``).

::

    from hive_ratelimit_plugin.metrics import instrument

    metrics = instrument(limiter)            # registers into prometheus_client.REGISTRY
    metrics.serve(9464)                      # or: instrument(limiter, registry=my_registry)

Everything is read when Prometheus scrapes (a custom collector over the limiter's counters and
state), so calls pay nothing for metrics: no per-call work is added to admission. The token and
cost counters come from the engine's settlement outbox (the rows it already hands to the
ledger), switched on by :func:`instrument`.

Metric names and labels are listed in docs/monitoring.md.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from typing import Any

try:
    from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
    from prometheus_client.registry import Collector
except ImportError as _exc:  # pragma: no cover - exercised by a test with the module hidden
    raise ImportError(
        "hive_ratelimit_plugin.metrics needs prometheus-client: pip install 'hive-ratelimit[prometheus]'"
    ) from _exc

from ._observe import WAIT_BUCKETS

__all__ = ["CIRCUIT_STATES", "LimiterMetrics", "instrument", "serve"]

#: Values of ``hive_ratelimit_circuit_state``.
CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}
_P = "hive_ratelimit"


_claimed: weakref.WeakSet[Any] = weakref.WeakSet()  # registries holding a LimiterMetrics
_claim_lock = threading.Lock()


class LimiterMetrics(Collector):
    """A Prometheus collector over one limiter. Create it with :func:`instrument`.

    Raises:
        ValueError: ``registry`` already holds another limiter's metrics (the names would clash;
            give each limiter its own registry).
    """

    def __init__(self, limiter: Any, registry: CollectorRegistry | None = None) -> None:
        self.limiter = limiter
        self.registry = registry if registry is not None else REGISTRY
        with _claim_lock:
            if self.registry in _claimed:
                raise ValueError("this registry already holds a limiter's metrics (hive_ratelimit_*); "
                                 "give each limiter its own CollectorRegistry")
            _claimed.add(self.registry)
        self._server: Any = None
        self.port: int | None = None  # the port served, after serve()
        self._thread: threading.Thread | None = None
        obs = limiter._obs
        if not obs.wants_rows:
            obs.wants_rows = True
            limiter._engine.record_spend = True  # settled rows go to the outbox, and from it to us
        self.registry.register(self)

    # ------------------------------------------------------------------ serve
    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` of this collector's registry over HTTP in a daemon thread.

        Args:
            port: TCP port; ``0`` picks a free one.
            addr: address to bind (``0.0.0.0`` to let other hosts scrape).

        Returns:
            The port bound.
        """
        if self._server is not None:
            raise RuntimeError(f"already serving on port {self.port}")
        server, thread = start_http_server(port, addr=addr, registry=self.registry)
        self._server, self._thread = server, thread
        self.port = int(server.server_address[1])
        return self.port

    def close(self) -> None:
        """Stop the HTTP server (if served) and unregister from the registry."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        try:
            self.registry.unregister(self)
        except KeyError:
            return  # closed before
        with _claim_lock:
            _claimed.discard(self.registry)

    # ---------------------------------------------------------------- collect
    def describe(self) -> list[Any]:
        return []  # names are dynamic enough; skip the registry's duplicate check by describe

    def collect(self) -> Iterator[Any]:
        lim = self.limiter
        eng = lim._engine
        obs = lim._obs
        with obs._lock:
            rejections = dict(obs.rejections)
            wait_buckets = list(obs.wait_buckets)
            wait_sum, waited = obs.wait_sum, obs.waited
            p429 = dict(obs.provider_429s)
            settled = {k: list(v) for k, v in obs.settled.items()}
            events = dict(obs.events)

        admitted = eng.admitted_total
        yield CounterMetricFamily(f"{_P}_calls_admitted", "Calls admitted (sent to the provider).", value=admitted)
        yield CounterMetricFamily(f"{_P}_calls_queued", "Calls that had to wait in the queue.",
                                  value=eng.queued_total)
        yield GaugeMetricFamily(f"{_P}_queue_depth", "Calls waiting now.", value=eng.queue_length)
        rej = CounterMetricFamily(f"{_P}_calls_rejected", "Calls stopped before they were sent.",
                                  labels=["level", "reason"])
        for (level, reason), n in sorted(rejections.items()):
            rej.add_metric([level, reason], n)
        yield rej

        # Calls admitted at once waited 0 s: they fill the lowest bucket without costing a thing.
        at_once = max(admitted - waited, 0)
        buckets = []
        acc = at_once
        for bound, n in zip(WAIT_BUCKETS, wait_buckets, strict=False):
            acc += n
            buckets.append((_fmt(bound), acc))
        acc += wait_buckets[-1]
        buckets.append(("+Inf", acc))
        yield HistogramMetricFamily(f"{_P}_queue_wait_seconds", "Time calls waited before admission.",
                                    buckets=buckets, sum_value=wait_sum)

        currency = eng.currency
        req = CounterMetricFamily(f"{_P}_calls_settled", "Calls settled with their usage.",
                                  labels=["provider", "model"])
        tok = CounterMetricFamily(f"{_P}_tokens", "Tokens used (as reported by the provider, else estimated).",
                                  labels=["provider", "model", "direction"])
        cost = CounterMetricFamily(f"{_P}_cost", "Money spent, in the budget currency.",
                                   labels=["provider", "model", "currency"])
        for (provider, model), (n, tin, tout, c) in sorted(settled.items()):
            req.add_metric([provider, model], n)
            tok.add_metric([provider, model, "input"], tin)
            tok.add_metric([provider, model, "output"], tout)
            cost.add_metric([provider, model, currency], c)
        yield req
        yield tok
        yield cost

        seen = CounterMetricFamily(f"{_P}_provider_429", "Provider 429/529 answers seen.",
                                   labels=["provider", "model"])
        for (provider, model), n in sorted(p429.items()):
            seen.add_metric([provider, model], n)
        yield seen
        yield CounterMetricFamily(f"{_P}_provider_429_retried", "Provider 429s retried for their caller.",
                                  value=eng.retried_total)

        ev = CounterMetricFamily(f"{_P}_events", "Events emitted (on_event), by type.", labels=["type"])
        for kind, n in sorted(events.items()):
            ev.add_metric([kind], n)
        yield ev

        circuit = GaugeMetricFamily(f"{_P}_circuit_state", "Circuit breaker: 0 closed, 1 half-open, 2 open.",
                                    labels=["scope"])
        cooldown = GaugeMetricFamily(f"{_P}_provider_cooldown_seconds", "Seconds left of a provider cooldown.",
                                     labels=["scope"])
        for key, entry in sorted(eng.provider_state().items()):
            circuit.add_metric([key], CIRCUIT_STATES.get(entry.get("circuit", "closed"), 0))
            cooldown.add_metric([key], float(entry.get("cooldown_seconds", 0.0)))
        yield circuit
        yield cooldown

        util = GaugeMetricFamily(f"{_P}_budget_utilization", "Budget spent / limit (1 = exhausted).",
                                 labels=["scope", "budget", "window"])
        spent = GaugeMetricFamily(f"{_P}_budget_spent", "Budget spent in the current window.",
                                  labels=["scope", "budget", "window"])
        limit = GaugeMetricFamily(f"{_P}_budget_limit", "Budget limit of the current window.",
                                  labels=["scope", "budget", "window"])
        for key, entry in sorted(eng.budget_snapshot().items()):
            for name, b in sorted(entry.items()):
                labels = [key, name, str(b["window"])]
                util.add_metric(labels, b["spent"] / b["limit"] if b["limit"] else 0.0)
                spent.add_metric(labels, b["spent"])
                limit.add_metric(labels, b["limit"])
        yield util
        yield spent
        yield limit

        rate = GaugeMetricFamily(f"{_P}_limit_utilization", "Rate window or concurrency used / limit.",
                                 labels=["level", "scope", "limit"])
        inflight = GaugeMetricFamily(f"{_P}_in_flight", "Calls in flight.", labels=["level", "scope"])
        for key, entry in sorted(eng.snapshot().items()):
            level = str(entry.get("level"))
            inflight.add_metric([level, key], entry.get("in_flight", 0))
            for name, value in entry.items():
                if isinstance(value, dict) and value.get("limit"):
                    rate.add_metric([level, key, name], value["used"] / value["limit"])
        yield rate
        yield inflight


def _fmt(bound: float) -> str:
    return repr(float(bound))


def instrument(limiter: Any, registry: CollectorRegistry | None = None) -> LimiterMetrics:
    """Expose ``limiter``'s metrics in ``registry`` (default: ``prometheus_client.REGISTRY``)."""
    return LimiterMetrics(limiter, registry)


def serve(limiter: Any, port: int, addr: str = "127.0.0.1",
          registry: CollectorRegistry | None = None) -> LimiterMetrics:
    """Instrument ``limiter`` and serve ``/metrics`` on ``addr:port`` in a daemon thread."""
    metrics = instrument(limiter, registry if registry is not None else CollectorRegistry())
    metrics.serve(port, addr)
    return metrics
