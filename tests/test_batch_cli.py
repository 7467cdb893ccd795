"""``nautilus-pipeline batch``: exit codes for bad input, one line per failed symbol, and a
Ctrl-C that stops the jobs and merges what finished."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time

import orjson
import pyarrow.parquet as pq
import pytest
from test_batch import assert_accounting_closes, generated, split_real

from nautilus_pipeline.cli import main


@pytest.fixture(autouse=True)
def _restore_logging():
    """main() configures structlog for the process; give later tests the defaults back."""
    yield
    import structlog

    structlog.reset_defaults()


def test_help_has_examples():
    out = subprocess.run([sys.executable, "-m", "nautilus_pipeline.cli", "batch", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "examples:" in out and "--executor {local,ray}" in out and "--ray-address" in out


def test_an_empty_glob_or_mixed_formats_exit_2_naming_them(sample_dir, tmp_path, capsys):
    assert main(["batch", "default", str(tmp_path / "none-*.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "none-*.csv: the pattern matches no file" in capsys.readouterr().err
    split_real(sample_dir, tmp_path / "in", damage=False)
    (tmp_path / "in" / "x.parquet").write_bytes((sample_dir / "nautilus-binance-btcusdt-trades.parquet").read_bytes())
    assert main(["batch", "default", str(tmp_path / "in" / "*"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "mixed formats" in err and "x.parquet" in err
    assert main(["batch", "default", str(tmp_path / "in" / "*.csv"), "--out", str(tmp_path / "o"),
                 "--ray-address", "localhost:6379"]) == 2


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="pinning needs sched_setaffinity (Linux)")
def test_a_bad_cpu_list_exits_2_naming_it(tmp_path, capsys):
    generated(tmp_path / "in", "AAAUSDT", days=1, n=2000)
    args = ["batch", "default", str(tmp_path / "in" / "*.csv"), "--out", str(tmp_path / "o")]
    assert main([*args, "--cpus", "zero"]) == 2
    assert "--cpus: expected CPUs like 0,2,4-7, auto or none, got 'zero'" in capsys.readouterr().err
    usable = min(os.sched_getaffinity(0))
    assert main([*args, "--cpus", str(usable), "--workers", "2"]) == 2
    assert "--cpus names 1 CPU(s) for 2 workers" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_an_unreadable_file_exits_4_naming_it_and_the_rest_is_merged(sample_dir, tmp_path, capsys):
    split_real(sample_dir, tmp_path / "in", damage=False)
    bad = tmp_path / "in" / "ETHUSDT-trades-2024-08-03.csv.gz"
    bad.write_bytes(gzip.compress(b"1,2,3\n")[:10] + b"\xff" * 64)
    out = tmp_path / "out"
    assert main(["batch", "default", str(tmp_path / "in" / "*"), "--out", str(out), "--workers", "2"]) == 4
    captured = capsys.readouterr()
    assert f"error: ETHUSDT: DataError: {bad}" in captured.err
    assert "3 of 6 files" in captured.out
    assert pq.read_table(out / "signals").num_rows > 0
    summary = orjson.loads((out / "summary.json").read_bytes())
    assert summary["files"][str(bad)]["status"] == "failed"
    assert_accounting_closes(summary)


def test_ctrl_c_stops_the_jobs_and_merges_what_finished(tmp_path):
    files = generated(tmp_path / "in", days=6, n=40_000)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "nautilus_pipeline.cli", "batch", "default", str(tmp_path / "in" / "*.csv"),
         "--out", str(out), "--workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if list((out / "jobs").glob("*/.0001-*")):
            break  # the second job has started: the driver has the first one's result
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    summary = orjson.loads((out / "summary.json").read_bytes())
    assert summary["interrupted"] is True
    done = [f for f in summary["files"].values() if f["status"] == "done"]
    assert 1 <= len(done) < len(files)
    assert {f["status"] for f in summary["files"].values()} == {"done", "not_run"}
    assert pq.read_table(out / "trace").num_rows == sum(f["delivered"] for f in done)
    assert_accounting_closes(summary)


def test_the_progress_bar_counts_jobs_ticks_and_failed_symbols():
    import io

    from rich.console import Console

    from nautilus_pipeline.batch.job import JobResult
    from nautilus_pipeline.cli import _BatchProgress

    text = io.StringIO()
    with _BatchProgress(Console(file=text, force_terminal=True, width=120), True) as bar:
        bar.start(3)
        bar.job_done(JobResult("A/0000", ("a.csv",), "o", {}, {}, {"read": 1234}, {}, b""))
        bar.chain_failed("B", "DataError: b.csv: cut short", 2)
        bar.bar.refresh()
        assert bar.bar.tasks[0].completed == 3 and bar.bar.tasks[0].total == 3
    assert "1,234 ticks" in text.getvalue() and "1 failed" in text.getvalue()


def test_sigterm_while_planning_leaves_a_summary_of_nothing_run(sample_dir, tmp_path, monkeypatch, capsys):
    import importlib
    import os

    planning = importlib.import_module("nautilus_pipeline.batch.plan")  # the module, not the function
    split_real(sample_dir, tmp_path / "in", damage=False)
    inspect = planning.inspect_file

    def inspect_then_sigterm(*args, **kwargs):
        info = inspect(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal, delivered while the plan runs
        return info

    monkeypatch.setattr(planning, "inspect_file", inspect_then_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    assert main(["batch", "default", str(tmp_path / "in" / "*.csv"), "--out", str(out), "--workers", "1"]) == 143
    summary = orjson.loads((out / "summary.json").read_bytes())
    assert summary["interrupted"] is True and summary["interrupted_in"] == "plan"
    assert len(summary["files"]) == 5 and {f["status"] for f in summary["files"].values()} == {"not_run"}
    assert summary["jobs"] == [] and summary["outputs"] == {}
    assert_accounting_closes(summary)
    assert signal.getsignal(signal.SIGTERM) is before


def test_ctrl_c_while_merging_leaves_a_summary_of_the_kinds_merged(sample_dir, tmp_path, monkeypatch):
    import os

    from nautilus_pipeline.batch import merge, run_batch

    split_real(sample_dir, tmp_path / "in", damage=False)
    install = merge._install

    def install_then_sigint(*args, **kwargs):
        install(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)  # as the first kind is put in place

    monkeypatch.setattr(merge, "_install", install_then_sigint)
    out = tmp_path / "out"
    report = run_batch("default", [str(tmp_path / "in" / "*.csv")], out, workers=2)
    assert report.exit_code == 130
    summary = orjson.loads((out / "summary.json").read_bytes())
    assert summary["interrupted"] is True and summary["interrupted_in"] == "merge"
    assert {f["status"] for f in summary["files"].values()} == {"done"}
    (kind,) = summary["outputs"]
    assert summary["merge_incomplete"] and kind not in summary["merge_incomplete"]
    assert pq.read_table(out / kind).num_rows == summary["outputs"][kind]["rows"] > 0
    assert not list(out.glob(".*.merging")) and not any((out / k).exists() for k in summary["merge_incomplete"])
    assert len(list((out / "jobs").glob("*/*/*.parquet"))) >= len(summary["jobs"])
    assert_accounting_closes(summary)
