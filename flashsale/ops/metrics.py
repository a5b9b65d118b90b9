"""Prometheus metrics, one registry per process component (no module globals)."""

from __future__ import annotations

import bisect
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
TALLY_SALES_MAX = 1000  # sales tallied between two stats flushes (FLASHSALE_LIVE_SALES_MAX's cap)


class SaleTally:
    """Reservations per sale since the last stats flush (flashsale/ops/stats.py),
    for the dashboard's per-sale charts: ``o:<outcome>`` counts and ``b:<i>``
    latency counts per bucket (not cumulative; ``i`` indexes LATENCY_BUCKETS_S,
    one past its end for slower). Not a Prometheus metric (there the sale id is
    a label only at scrape time, for the bounded live sales); at most
    TALLY_SALES_MAX sales between two flushes, others are left out."""

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, int]] = {}

    def note(self, sale_id: str, outcome: str, seconds: float) -> None:
        c = self.counts.get(sale_id)
        if c is None:
            if len(self.counts) >= TALLY_SALES_MAX:
                return
            c = self.counts[sale_id] = {}
        for field in (f"o:{outcome}", f"b:{bisect.bisect_left(LATENCY_BUCKETS_S, seconds)}"):
            c[field] = c.get(field, 0) + 1

    def take(self) -> dict[str, dict[str, int]]:
        """What was counted since the last take (the tally starts afresh)."""
        taken, self.counts = self.counts, {}
        return taken

    def give_back(self, taken: dict[str, dict[str, int]]) -> None:
        """A flush failed: its counts go with the next one."""
        for sale_id, counts in taken.items():
            for field, n in counts.items():
                c = self.counts.setdefault(sale_id, {})
                c[field] = c.get(field, 0) + n


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self._front(r)
        self._pipeline(r)
        self._live(r)
        self._room_and_processes(r)
        self._children: dict[tuple[str, str], Any] = {}
        self.per_sale = SaleTally()

    def _front(self, r: CollectorRegistry) -> None:
        """The HTTP front: reservations by outcome, their latency, responses."""
        self.reservations = Counter(
            "flashsale_reservations", "Reservation requests by outcome", ["outcome"], registry=r
        )
        self.reserve_latency = Histogram(
            "flashsale_reserve_latency_seconds", "Reservation handler latency",
            buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.http_requests = Counter(
            "flashsale_http_requests", "HTTP responses by status class", ["status"], registry=r
        )
        self.stream_lag = Gauge(
            "flashsale_stream_lag_entries", "Accepted orders not yet persisted (all sales)",
            registry=r,
        )

    def _pipeline(self, r: CollectorRegistry) -> None:
        """The consumer, the releases and the payment inbox."""
        self.orders_persisted = Counter(
            "flashsale_orders_persisted", "Orders persisted by the consumer", registry=r
        )
        self.orders_failed = Counter(
            "flashsale_orders_failed", "Orders whose final deduction was refused", registry=r
        )
        self.consumer_reclaimed = Counter(
            "flashsale_consumer_reclaimed", "Stream entries reclaimed with XAUTOCLAIM", registry=r
        )
        self.consumer_errors = Counter(
            "flashsale_consumer_errors", "Consumer rounds that failed and were retried", registry=r
        )
        self.dead_lettered = Counter(
            "flashsale_dead_lettered", "Stream entries moved to the dead-letter stream", registry=r
        )
        self.consumer_group_recreated = Counter(
            "flashsale_consumer_group_recreated",
            "Consumer groups recreated at id 0 on a stream that had lost its group", registry=r,
        )
        self.releases = Counter(
            "flashsale_releases", "Holds released by reason", ["reason"], registry=r
        )
        self.payment_inbox_events = Gauge(
            "flashsale_payment_inbox_events",
            "Gateway events kept for orders not persisted yet, not applied yet", registry=r,
        )
        self.payment_inbox_oldest_age = Gauge(
            "flashsale_payment_inbox_oldest_age_seconds",
            "Age of the oldest gateway event waiting in the payment inbox (0: none)", registry=r,
        )

    def _live(self, r: CollectorRegistry) -> None:
        """Live sales' figures, set at scrape time."""
        # set at scrape time by flashsale/ops/observe.py (front) and flashsale/ops/worker_http.py
        self.sale_units = Gauge(
            "flashsale_sale_units", "A live sale's ledger figure (units of stock)",
            ["sale_id", "figure"], registry=r,
        )
        self.sale_consistent = Gauge(
            "flashsale_sale_ledger_consistent", "1 when a live sale's ledger is consistent",
            ["sale_id"], registry=r,
        )
        self.sale_stream = Gauge(
            "flashsale_sale_stream_entries",
            "A live sale's stream: lag (not persisted), pending (delivered, unacked), dead_letter",
            ["sale_id", "kind"], registry=r,
        )
        self.stream_pending = Gauge(
            "flashsale_stream_pending_entries",
            "Stream entries delivered to a consumer and not yet acked (live sales)", registry=r,
        )
        self.dead_letters = Gauge(
            "flashsale_dead_letter_entries", "Entries in the dead-letter streams (live sales)",
            registry=r,
        )
        self.ledger_inconsistent = Gauge(
            "flashsale_ledger_inconsistent_sales", "Live sales whose ledger is inconsistent",
            registry=r,
        )

    def _room_and_processes(self, r: CollectorRegistry) -> None:
        """The waiting rooms, the backends and the worker processes (scrape time)."""
        self.room_tickets = Gauge(
            "flashsale_room_tickets",
            "A live sale's waiting room: waiting, admitted (outstanding passes), admitted_total, "
            "used, expired tickets", ["sale_id", "state"], registry=r,
        )
        self.room_admit_rate = Gauge(
            "flashsale_room_admit_per_second",
            "A live sale's waiting room: configured and measured (last 10 s) admission rate",
            ["sale_id", "kind"], registry=r,
        )
        self.room_last_eta = Gauge(
            "flashsale_room_last_place_eta_seconds",
            "A live sale's waiting room: ETA range of the last place (absent when unknown: "
            "paused, or waiting on held stock)", ["sale_id", "bound"], registry=r,
        )
        self.room_paused = Gauge(
            "flashsale_room_paused", "1 while a live sale's waiting room is paused",
            ["sale_id"], registry=r,
        )
        self.live_sales = Gauge("flashsale_live_sales", "Sales counted as live", registry=r)
        self.backend_ready = Gauge(
            "flashsale_backend_ready", "1 when the backend answers", ["backend"], registry=r
        )
        self.workers_alive = Gauge(
            "flashsale_workers_alive", "Worker processes whose heartbeat is recent, by role",
            ["role"], registry=r,
        )
        self.worker_up = Gauge(
            "flashsale_worker_up", "1 while this process's worker loops run", ["role"],
            registry=r,
        )


    def _child(self, metric: Counter, label: str) -> Any:
        """labels() does a lookup under a lock on every call; bind children once."""
        key = (metric._name, label)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(label)
        return child

    def count_reservation(self, outcome: str) -> None:
        self._child(self.reservations, outcome).inc()

    def count_response(self, status: int) -> None:
        self._child(self.http_requests, f"{status // 100}xx").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
