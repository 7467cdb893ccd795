"""The command line: run writes outputs and a summary, exit codes, inspect, devices, report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest

from nautilus_pipeline.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_logging():
    """main() configures structlog for the process; give later tests the defaults back."""
    yield
    import structlog

    structlog.reset_defaults()
DEFAULT = str(REPO / "pipelines" / "default.toml")


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["run", DEFAULT, "--out", str(out)]) == 0
    return out


def test_run_writes_every_output_and_a_summary_that_adds_up(default_run):
    names = {p.name for p in default_run.iterdir()}
    assert {"signals.jsonl", "signals.parquet", "vpin.jsonl", "vpin.parquet", "risk.jsonl",
            "risk.parquet", "trace.parquet", "summary.json"} <= names
    summary = orjson.loads((default_run / "summary.json").read_bytes())
    t = summary["ticks"]
    assert t["read"] == 21313 == t["delivered"] + t["rejected"] + t["quarantined"]
    assert t["processed"] == t["delivered"]
    assert [s["stage"] for s in summary["stages"]] == ["features", "inference", "vpin", "risk", "signal", "recorder"]
    assert all(s["stream"] for s in summary["stages"])
    assert summary["leaked_leases"] == []
    signals = pq.read_table(default_run / "signals.parquet").to_pylist()
    lines = (default_run / "signals.jsonl").read_bytes().splitlines()
    assert len(signals) == len(lines) == summary["outputs"]["signals"] > 0
    assert set(signals[0]) >= {"ts_ns", "symbol", "side", "strength", "target_position", "reasons"}


def test_the_summary_title_says_the_cores_busy_over_the_run(default_run, capsys):
    """``cpu_s / wall_s`` beside ticks/s; a summary.json from before ``cpu_s`` prints without it."""
    from nautilus_pipeline.cli import _print_summary

    summary = orjson.loads((default_run / "summary.json").read_bytes())
    assert summary["cpu_s"] > 0
    _print_summary(summary, default_run)
    title = capsys.readouterr().out.splitlines()[0].rstrip()
    assert title.endswith(f"ticks/s, {summary['cpu_s'] / summary['wall_s']:.2f} cores busy)")
    del summary["cpu_s"]
    _print_summary(summary, default_run)
    assert capsys.readouterr().out.splitlines()[0].rstrip().endswith(" ticks/s)")


def test_two_runs_give_byte_identical_outputs(default_run, tmp_path):
    assert main(["run", DEFAULT, "--out", str(tmp_path)]) == 0
    for name in ("signals.jsonl", "vpin.jsonl", "risk.jsonl"):
        assert (tmp_path / name).read_bytes() == (default_run / name).read_bytes(), name


def test_report_draws_a_png_and_html(default_run):
    assert main(["report", str(default_run), "--html"]) == 0
    png = (default_run / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    assert b"Bokeh" in (default_run / "report.html").read_bytes()


def test_bad_definition_exits_3_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[stages]]\ntype = "vpin"\nbucket_volum = 1\n')
    assert main(["run", str(bad)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean 'bucket_volume'" in err[0]


def test_missing_tick_file_exits_4(capsys):
    assert main(["run", DEFAULT, "--ticks", "no/such/file.csv"]) == 4
    assert "no such file" in capsys.readouterr().err


def test_bad_arguments_exit_2():
    with pytest.raises(SystemExit) as info:
        main(["run"])
    assert info.value.code == 2


def test_validate_and_inspect(sample_dir, capsys):
    assert main(["validate", DEFAULT]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["inspect", str(sample_dir / "binance-um-btcusdt-trades-20240808.csv")]) == 0
    out = capsys.readouterr().out
    assert "binance_trades" in out and "21313" in out and "bad_rows" in out


def test_devices_lists_every_stream_with_a_reason(capsys):
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    for name in ("cpu", "torch:cuda", "mlx:gpu", "coreml:ane"):
        assert name in out


def test_help_has_examples_for_every_command():
    for command in ("run", "report", "devices", "inspect", "validate"):
        out = subprocess.run([sys.executable, "-m", "nautilus_pipeline.cli", command, "--help"],
                             capture_output=True, text=True, check=True).stdout
        assert "examples:" in out, command


def test_piped_run_has_no_progress_bar_and_json_logs(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "nautilus_pipeline.cli", "run", str(REPO / "pipelines" / "vpin.toml"),
         "--out", str(tmp_path), "--log-level", "info"],
        capture_output=True, text=True, check=True,
    )
    assert "replay" not in proc.stderr.split("{")[0]  # no bar drawn
    logs = [orjson.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert any(entry.get("event") == "pipeline_started" for entry in logs)
    assert "vpin: 21,313 ticks" in proc.stdout


def test_ctrl_c_drains_writes_what_was_processed_and_exits_130(tmp_path):
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "nautilus_pipeline.cli", "run", DEFAULT, "--out", str(tmp_path),
         "--speed", "5", "--batch", "256"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 60
    while not (tmp_path / "vpin.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.2)  # wait until the run is under way
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "interrupted: partial run" in " ".join(out.split())
    summary = orjson.loads((tmp_path / "summary.json").read_bytes())
    assert summary["interrupted"] is True
    assert 0 < summary["ticks"]["processed"] < 21313
    assert summary["leaked_leases"] == []


def test_metrics_port_serves_prometheus_metrics_during_a_run(tmp_path):
    import socket
    import time
    import urllib.request

    pytest.importorskip("prometheus_client", reason="prometheus-client is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "nautilus_pipeline.cli", "run", DEFAULT, "--out", str(tmp_path),
         "--speed", "5", "--batch", "256", "--metrics-port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        body = ""
        deadline = time.monotonic() + 60
        while "nautilus_ticks_total{outcome=\"processed\"}" not in body and time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            except OSError:
                continue
        assert 'nautilus_ticks_total{outcome="processed"}' in body
        assert 'nautilus_stage_batch_latency_seconds_count{stage="features"}' in body
    finally:
        proc.send_signal(__import__("signal").SIGINT)
        proc.communicate(timeout=60)
