"""``inspect`` on many files, JSON output, aggressor sides; the progress bar's totals; JSON errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from nautilus_pipeline.app import estimate_rows as _estimate_rows
from nautilus_pipeline.cli import _progress, _TotalEstimate, main
from nautilus_pipeline.io import Replay, Source

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_logging():
    yield
    import structlog

    structlog.reset_defaults()


def test_inspect_goes_on_after_a_bad_file_and_exits_with_the_worst(sample_dir, tmp_path, capsys):
    good = sample_dir / "binance-um-btcusdt-trades-20240808.csv"
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    code = main(["inspect", str(good), str(tmp_path / "missing.csv"), str(empty),
                 str(sample_dir / "tardis-bitmex-xbtusd-trades.csv")])
    out, err = capsys.readouterr()
    assert code == 4
    assert out.count("format ") == 2 and "tardis_trades" in out and "binance_trades" in out
    errors = err.strip().splitlines()
    assert len(errors) == 2 and "missing.csv: no such file" in errors[0] and "empty" in errors[1]


def test_inspect_json_has_one_object_per_file_errors_included(sample_dir, tmp_path, capsys):
    files = [sample_dir / "databento-glbx-futures-trades-20240701.dbn.zst", tmp_path / "nope.csv",
             sample_dir / "binance-feed-spot-ethusdt_20240808.jsonl.gz"]
    assert main(["inspect", "--json", *map(str, files)]) == 4
    report = orjson.loads(capsys.readouterr().out)
    assert [r["file"] for r in report] == [str(f) for f in files]
    dbn, missing, feed = report
    assert dbn["format"] == "databento" and dbn["trades"] == dbn["ticks"] > 0
    assert missing["exit_code"] == 4 and "no such file" in missing["error"]
    assert feed["quotes"] > 0 and feed["trades"] > 0 and {"bid", "ask"} <= set(feed["tick_columns_filled"])


def test_inspect_reports_side_when_every_trade_is_a_sell(sample_dir, capsys):
    """The bundled BitMEX sample: ten trades, all seller-initiated (side = -1)."""
    assert main(["inspect", "--json", str(sample_dir / "tardis-bitmex-xbtusd-trades.csv")]) == 0
    (info,) = orjson.loads(capsys.readouterr().out)
    assert info["trade_sides"] == {"buy": 0, "sell": 10, "unknown": 0}
    assert "side" in info["tick_columns_filled"]


def test_inspect_quotes_have_no_side_and_no_trades(sample_dir, capsys):
    assert main(["inspect", "--json", str(sample_dir / "truefx-usdjpy-quotes.csv")]) == 0
    (info,) = orjson.loads(capsys.readouterr().out)
    assert info["trades"] == 0 and info["quotes"] == 1000
    assert "side" not in info["tick_columns_filled"] and "bid" in info["tick_columns_filled"]


def test_json_log_format_writes_the_final_error_as_json(tmp_path):
    for argv in (["inspect", str(tmp_path / "nope.csv")],
                 ["run", str(REPO / "pipelines" / "vpin.toml"), "--ticks", str(tmp_path / "nope.csv")]):
        proc = subprocess.run([sys.executable, "-m", "nautilus_pipeline.cli", *argv, "--log-format", "json"],
                              capture_output=True, text=True)
        assert proc.returncode == 4
        lines = proc.stderr.strip().splitlines()
        entries = [orjson.loads(line) for line in lines]  # every line is JSON
        assert entries[-1]["event"] == "command_failed" and entries[-1]["level"] == "error"
        assert entries[-1]["exit_code"] == 4 and "nope.csv" in entries[-1]["error"]


def test_row_total_does_not_count_the_header(sample_dir):
    for name, rows in (("binance-um-btcusdt-trades-20240808.csv", 21313),  # header line
                       ("binance-spot-ethusdt-trades-20240808.csv", 6106),  # no header
                       ("truefx-usdjpy-quotes.csv", 1000)):
        src = Source(sample_dir / name)
        assert _estimate_rows([src]) == rows, name


NO_PROC = not os.path.isdir("/proc/self/fdinfo")


@pytest.mark.parametrize("name", ["binance-feed-spot-ethusdt_20240808.jsonl.gz",
                                  "databento-glbx-futures-mbp1-20240701.dbn.zst"])
def test_compressed_and_binary_inputs_get_an_exact_total_once_read(sample_dir, name):
    src = Source(sample_dir / name)
    assert _estimate_rows([src]) is None  # no cheap row count up front
    replay = Replay([src])
    bar = _progress(None, False, None, replay)
    assert bar.estimate is not None
    delivered = sum(len(b["ts_ns"]) for b in replay.iter_arrays(batch_size=256))
    assert bar.estimate() == delivered > 0


@pytest.mark.skipif(NO_PROC, reason="bytes read come from /proc/self/fdinfo (Linux)")
def test_total_is_estimated_from_the_bytes_read_while_reading(shared_data):
    path = shared_data / "binance-feed-usdm-btcusdt_20240808.jsonl.gz"
    replay = Replay([Source(path)])
    estimate = _TotalEstimate.of(replay)
    blocks = replay.iter_arrays(batch_size=4096)
    next(blocks)
    read = estimate.bytes_read()
    # some of the file (the reader reads ahead in blocks, possibly all of a small file) is read
    assert 0 < read <= path.stat().st_size
    early = estimate()
    delivered = 4096 + sum(len(b["ts_ns"]) for b in blocks)
    assert early is not None and 0.5 * delivered < early < 2 * delivered
    estimate._last = (-1.0, None)  # past the 0.2 s throttle
    assert estimate() == delivered
    assert estimate.bytes_read() == path.stat().st_size  # closed after the last row: all of it
