"""Prometheus metrics for long live runs (``nautilus-pipeline run --metrics-port PORT``).

prometheus-client serves ``/metrics`` from its own daemon thread; the run refreshes the
values from the pipeline's counters after every batch (a few dozen gauge writes), so
scraping costs the pipeline nothing. Metric names follow Prometheus conventions: seconds
and totals, labelled by stage.
"""

from __future__ import annotations

from typing import Any


class MetricsExporter:
    """Publishes a pipeline's and a replay's counters on ``http://host:port/metrics``."""

    def __init__(self, port: int, *, addr: str = "0.0.0.0"):
        try:
            import prometheus_client as prom
        except ImportError as exc:  # pragma: no cover - depends on the install
            from .errors import ConfigError

            raise ConfigError(
                "--metrics-port needs prometheus-client (pip install 'nautilus-pipeline[metrics]')"
            ) from exc
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.ticks = prom.Gauge("nautilus_ticks_total", "ticks by outcome", ["outcome"], registry=r)
        self.stage_rows = prom.Gauge("nautilus_stage_rows_total", "rows processed", ["stage", "stream"], registry=r)
        self.stage_latency = prom.Gauge("nautilus_stage_batch_latency_seconds", "batch latency",
                                        ["stage", "quantile"], registry=r)
        self.stage_fallbacks = prom.Gauge("nautilus_stage_fallbacks_total", "batches rerun on the fallback",
                                          ["stage"], registry=r)
        self.pool = prom.Gauge("nautilus_pool_slabs", "buffer pool slabs", ["state"], registry=r)
        self.copied = prom.Gauge("nautilus_pool_bytes_copied_total", "bytes copied", ["direction"], registry=r)
        self.market_ts = prom.Gauge("nautilus_replay_market_time_seconds", "market time reached", registry=r)
        self.server, self.thread = prom.start_http_server(port, addr=addr, registry=r)

    def update(self, pipe: Any, replay: Any = None) -> None:
        stats = pipe.stats()
        t = stats["ticks"]
        self.ticks.labels("in").set(t["ticks_in"])
        self.ticks.labels("processed").set(t["ticks_out"])
        self.ticks.labels("failed").set(t["ticks_failed"])
        if replay is not None:
            total = replay.accounting.total
            self.ticks.labels("read").set(total.read)
            self.ticks.labels("rejected").set(total.rejected)
            self.ticks.labels("quarantined").set(total.quarantined)
            if replay.progress.ts_reached_ns:
                self.market_ts.set(replay.progress.ts_reached_ns / 1e9)
        for s in stats["stages"]:
            self.stage_rows.labels(s["stage"], s["stream"]).set(s["rows"])
            self.stage_fallbacks.labels(s["stage"]).set(s["fallbacks"])
            lat = s["batch_latency"]
            for q in ("p50", "p99", "max"):
                self.stage_latency.labels(s["stage"], q).set(lat[f"{q}_us"] / 1e6)
        p = stats["pool"]
        self.pool.labels("in_use").set(p["in_use"])
        self.pool.labels("high_water").set(p["high_water"])
        self.pool.labels("total").set(p["slabs"])
        self.copied.labels("h2d").set(p["bytes_copied_h2d"])
        self.copied.labels("d2h").set(p["bytes_copied_d2h"])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
