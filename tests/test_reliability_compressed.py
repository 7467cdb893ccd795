"""Silent loss with compressed and damaged inputs, on every reading path of the CSV, Binance
trades and JSON-lines readers.

The promise is the uncompressed one: every data line is a delivered or a refused row, a
refusal does not depend on which path (numba or pyarrow, fast or exact) read the block, and a
compressed stream that is cut off or corrupt is a :class:`DataError` naming the file, never a
shorter read that looks complete. Paths are forced as in ``test_io_binance_fast.py``:
``PLAIN_MIN_BYTES`` 0 sends every block to the numba parser, ``1 << 62`` none.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from unittest import mock

import pytest
from test_io_binance_fast import rows

from nautilus_pipeline.io import Replay, Source, binance
from nautilus_pipeline.io.chunk import Reason
from nautilus_pipeline.io.csv import MAX_LINE

DATA = Path(__file__).resolve().parents[1] / "nautilus_pipeline" / "data"
UM = DATA / "binance-um-btcusdt-trades-20240808.csv"
LINES = UM.read_bytes().split(b"\n")  # header, 21,313 trades, "" after the last newline
ROWS = len(LINES) - 2


def pad_quote_qty(line: bytes, length: int) -> bytes:
    """The line with its quote_qty (a field the replay does not read) padded to ``length`` bytes."""
    f = line.split(b",")
    f[3] = f[3] + b"0" * (length - len(line))
    return b",".join(f)


def write(path: Path, lines: list[bytes], codec: str = "none") -> Path:
    data = b"\n".join(lines)
    path.write_bytes(gzip.compress(data) if codec == "gzip" else data)
    return path


# --- lines longer than MAX_LINE -------------------------------------------------------
@pytest.mark.parametrize("codec", ["none", "gzip"])
@pytest.mark.parametrize("garbage_elsewhere", [False, True])
def test_a_line_over_max_line_is_refused_on_every_path(tmp_path: Path, codec: str, garbage_elsewhere: bool) -> None:
    """A line of MAX_LINE + 1 bytes is a refused row, one of MAX_LINE bytes a row, whichever
    path reads the block: the numba parser took any length and pyarrow's fast parse lines of
    up to a few MiB, so such a line was delivered in a clean file and refused (by the exact
    path) when another line of its block was damaged."""
    lines = list(LINES)
    lines[101] = pad_quote_qty(lines[101], MAX_LINE + 1)  # file line 102
    lines[201] = pad_quote_qty(lines[201], MAX_LINE)  # file line 202: at the limit, read
    if garbage_elsewhere:
        lines[5001] = b"garbage"  # file line 5002
    path = write(tmp_path / ("BTCUSDT-trades-2024-08-08.csv" + (".gz" if codec == "gzip" else "")), lines, codec)
    refused = {102} | ({5002} if garbage_elsewhere else set())
    want = [int(ln.split(b",")[0]) for i, ln in enumerate(LINES[1:-1], start=2) if i not in refused]
    got = []
    for fast in (True, False):
        cols, dropped, _, _ = rows(path, fast)
        assert cols["trade_id"].tolist() == want
        assert [(d[0], d[1]) for d in dropped if d[0] == 102] == [(102, Reason.UNPARSABLE)]
        assert f"{MAX_LINE + 1:,} bytes" in next(d[3] for d in dropped if d[0] == 102)
        got.append([(d[0], d[1], d[3]) for d in dropped])
    assert got[0] == got[1]


def test_a_line_over_max_line_is_counted_as_refused_by_the_replay(tmp_path: Path) -> None:
    lines = list(LINES)
    lines[101] = pad_quote_qty(lines[101], 3 * MAX_LINE)
    path = write(tmp_path / "BTCUSDT-trades-2024-08-08.csv", lines)
    for fast in (True, False):
        with mock.patch.object(binance, "PLAIN_MIN_BYTES", 0 if fast else 1 << 62):
            replay = Replay([Source(path, policy="reject")])
            delivered = sum(len(b["ts_ns"]) for b in replay.iter_arrays(4096))
        replay.accounting.check()
        t = replay.accounting.total
        assert (t.read, delivered, t.rejected) == (ROWS, ROWS - 1, 1)
        assert dict(replay.accounting.sources[str(path)].by_reason) == {"unparsable": 1}


# --- bytes that are not UTF-8 ---------------------------------------------------------
@pytest.mark.parametrize("codec", ["none", "gzip"])
@pytest.mark.parametrize("garbage_elsewhere", [False, True])
def test_a_byte_that_is_not_utf8_refuses_its_row_only_in_a_field_that_is_read(tmp_path: Path, codec: str,
                                                                              garbage_elsewhere: bool) -> None:
    """A flipped high bit in quote_qty (not read) costs no row, in price it refuses the row,
    whichever path reads the block: the exact path refused both, so the first row was
    delivered in a clean block and refused once another line of its block was damaged."""
    lines = list(LINES)
    f = lines[101].split(b",")
    lines[101] = b",".join([*f[:3], f[3][:2] + b"\xff" + f[3][2:], *f[4:]])  # file line 102: quote_qty
    f = lines[301].split(b",")
    lines[301] = b",".join([f[0], f[1][:2] + b"\xb1" + f[1][3:], *f[2:]])  # file line 302: price
    if garbage_elsewhere:
        lines[5001] = b"garbage"  # file line 5002
    path = write(tmp_path / ("BTCUSDT-trades-2024-08-08.csv" + (".gz" if codec == "gzip" else "")), lines, codec)
    refused = {302} | ({5002} if garbage_elsewhere else set())
    want = [int(ln.split(b",")[0]) for i, ln in enumerate(LINES[1:-1], start=2) if i not in refused]
    got = []
    for fast in (True, False):
        cols, dropped, _, _ = rows(path, fast)
        assert cols["trade_id"].tolist() == want
        assert sorted(d[0] for d in dropped) == sorted(refused)
        assert [d[1] for d in dropped if d[0] == 302] == [Reason.UNPARSABLE]
        got.append(dropped)
    assert repr(got[0]) == repr(got[1])
