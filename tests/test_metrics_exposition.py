"""Prometheus exposition of a live run: parsed with prometheus_client's own parser, typed as
Prometheus means it, bound where asked; the Grafana dashboard queries only what is exported."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
import pytest

from nautilus_pipeline.cli import main

pytest.importorskip("prometheus_client", reason="prometheus-client is not installed (the 'metrics' extra)")
from prometheus_client.parser import text_string_to_metric_families

from nautilus_pipeline.prometheus import (
    LATENCY_BUCKETS_S,
    MetricsAddressError,
    MetricsExporter,
    parse_address,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT = str(REPO / "pipelines" / "default.toml")


@pytest.fixture(autouse=True)
def _restore_logging():
    yield
    import structlog

    structlog.reset_defaults()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def scraped(tmp_path_factory) -> str:
    """The /metrics text of a real run of the default pipeline, once its stages have batches."""
    port = _free_port()
    out = tmp_path_factory.mktemp("metrics")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nautilus_pipeline.cli", "run", DEFAULT, "--out", str(out),
         "--speed", "5", "--batch", "256", "--metrics-addr", f":{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    body = ""
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            time.sleep(0.3)
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            except OSError:
                continue
            if re.search(r'nautilus_stage_batch_latency_seconds_count\{stage="signal"\} [1-9]', body):
                break
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert "nautilus_stage_batch_latency_seconds_count" in body, "no scrape got the stages' metrics"
    return body


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_exposition_parses_and_counters_are_counters(scraped):
    fams = _families(scraped)
    for name in ("nautilus_ticks", "nautilus_stage_rows", "nautilus_stage_batches",
                 "nautilus_stage_fallbacks", "nautilus_stage_failures", "nautilus_stage_busy_seconds",
                 "nautilus_pool_acquire_waits", "nautilus_pool_bytes_copied"):
        assert fams[name].type == "counter", name
        assert fams[name].samples and all(s.name.endswith(("_total", "_created")) for s in fams[name].samples)
    outcomes = {s.labels["outcome"]: s.value for s in fams["nautilus_ticks"].samples}
    assert set(outcomes) == {"read", "delivered", "rejected", "quarantined", "processed", "failed"}
    assert 0 < outcomes["processed"] <= outcomes["delivered"] <= outcomes["read"]
    assert fams["nautilus_pool_slabs"].type == "gauge"
    assert fams["nautilus_run_info"].samples[0].labels["pipeline"] == "default"


def test_latency_is_a_histogram_with_numeric_cumulative_buckets(scraped):
    fam = _families(scraped)["nautilus_stage_batch_latency_seconds"]
    assert fam.type == "histogram"
    stages = {s.labels["stage"] for s in fam.samples}
    assert {"features", "inference", "vpin", "risk", "signal"} <= stages
    for stage in stages:
        buckets = [(float(s.labels["le"]), s.value) for s in fam.samples
                   if s.name.endswith("_bucket") and s.labels["stage"] == stage]
        assert [le for le, _ in buckets] == [*LATENCY_BUCKETS_S, float("inf")]
        counts = [c for _, c in buckets]
        assert counts == sorted(counts), f"{stage}: buckets not cumulative"
        count = next(s.value for s in fam.samples if s.name.endswith("_count") and s.labels["stage"] == stage)
        total = next(s.value for s in fam.samples if s.name.endswith("_sum") and s.labels["stage"] == stage)
        assert counts[-1] == count > 0 and total > 0
    assert "quantile=" not in scraped  # no p50/p99 text labels any more


def test_grafana_dashboard_queries_only_exported_metrics(scraped):
    dash = orjson.loads((REPO / "docs" / "grafana-dashboard.json").read_bytes())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    used = {m for e in exprs for m in re.findall(r"\bnautilus_[a-z_]+", e)}
    fams = list(text_string_to_metric_families(scraped))
    exported = {s.name for f in fams for s in f.samples}
    exported |= {f"{f.name}_total" for f in fams if f.type == "counter"}  # none yet (bad rows)
    assert used <= exported, f"dashboard queries metrics the run does not export: {used - exported}"


def test_metrics_bind_to_loopback_unless_a_host_is_given():
    exporter = MetricsExporter(":0")
    try:
        assert exporter.host == "127.0.0.1" and exporter.port > 0
    finally:
        exporter.close()
    assert parse_address("9100") == ("127.0.0.1", 9100)
    assert parse_address("0.0.0.0:9100") == ("0.0.0.0", 9100)
    assert parse_address("[::1]:9100") == ("::1", 9100)


@pytest.mark.parametrize("address", ["nohost", "host:99999", "a:b:c", "127.0.0.1:x"])
def test_malformed_metrics_address_is_one_line_exit_2(address, capsys):
    assert main(["run", DEFAULT, "--metrics-addr", address]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nautilus-pipeline: error: --metrics-addr")


def test_busy_metrics_port_is_one_line_exit_2_before_the_replay(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["run", DEFAULT, "--out", str(tmp_path), "--metrics-addr", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "port in use" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "summary.json").exists()
    with pytest.raises(MetricsAddressError):
        parse_address("::1:9")
