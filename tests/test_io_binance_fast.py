"""The numba parser of Binance trades lines (``io/binance_fast.py``) against the pyarrow path
(the reference): the same columns, line numbers, refused rows and raw records for the bundled
files, random files with odd lines in them, any block cut, and damaged files under every
policy. ``PLAIN_MIN_BYTES`` is set to 0 so that small files take the fast path."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gzip
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_io_damage import DAMAGES, build, damage_plan, write

from nautilus_pipeline.io import Replay, Source, binance, binance_fast
from nautilus_pipeline.io.binance import binance_trades

DATA = Path(__file__).resolve().parents[1] / "nautilus_pipeline" / "data"
UM = DATA / "binance-um-btcusdt-trades-20240808.csv"
SPOT = DATA / "binance-spot-ethusdt-trades-20240808.csv"
COLUMNS = ("ts_ns", "price", "size", "side", "trade_id", "kind", "symbol_id")


def rows(path: Path, fast: bool, chunk_rows: int = 65_536, block: int | None = None):
    with mock.patch.object(binance, "PLAIN_MIN_BYTES", 0 if fast else 1 << 62):
        r = binance_trades(path)
        r.options = dataclasses.replace(r.options, block_size=block)
        chunks = list(r.chunks(chunk_rows))
    cols = {k: np.concatenate([c.column(k) for c in chunks]) for k in COLUMNS}
    cols["records"] = np.concatenate([c.records for c in chunks])
    cols["bad"] = np.concatenate([c.bad if c.bad is not None else np.zeros(len(c.records), np.uint8) for c in chunks])
    dropped = [(b.record, b.reason, b.field, b.value, b.raw) for c in chunks for b in c.dropped]
    raw = [(c.raw(i), c.raw_line(i)) for c in chunks for i in range(len(c.records))
           if c.records[i] % 97 == 0 or (c.bad is not None and c.bad[i])]  # (a second pass over the file)
    maps = [c.field_map for c in chunks if len(c.records)]
    return cols, dropped, raw, maps


def same(path: Path, **kw) -> None:
    fast, slow = rows(path, True, **kw), rows(path, False, **kw)
    for k in fast[0]:
        assert fast[0][k].dtype == slow[0][k].dtype, k
        assert np.array_equal(fast[0][k].view(np.uint8), slow[0][k].view(np.uint8)), k  # bit for bit
    assert repr(fast[1:]) == repr(slow[1:])  # (repr: a NaN in a record equals itself)


@contextlib.contextmanager
def parse_block_calls():
    """The results of every ``binance_fast.parse_block`` call made inside (None: a block the
    fast path refused)."""
    calls: list = []
    real = binance_fast.parse_block

    def spy(*a):
        calls.append(out := real(*a))
        return out

    with mock.patch.object(binance_fast, "parse_block", spy):
        yield calls


def test_the_bundled_files_take_the_fast_path_and_read_the_same() -> None:
    with parse_block_calls() as calls:
        for path in (UM, SPOT):
            same(path)
            same(path, chunk_rows=1000, block=100_000)
    assert calls and all(c is not None for c in calls)  # every block of these files is plain


def test_a_quoted_header_over_plain_lines_takes_the_fast_path_and_reads_the_same(tmp_path) -> None:
    """pyarrow's ``write_csv`` quotes the names of a file whose values it leaves plain: the
    quotes of a header are no reason to send its plain lines to pyarrow's quoted parse."""
    lines = UM.read_text().splitlines()
    quoted = tmp_path / "BTCUSDT-trades-quoted-header.csv"
    quoted.write_text("\n".join([",".join(f'"{n}"' for n in lines[0].split(",")), *lines[1:]]) + "\n")
    with parse_block_calls() as calls:
        got = rows(quoted, True)
    assert calls and all(c is not None for c in calls)
    want = rows(UM, True)
    for k in want[0]:
        assert np.array_equal(got[0][k].view(np.uint8), want[0][k].view(np.uint8)), k
    assert repr(got[1:3]) == repr(want[1:3])  # refused rows, raw records


@pytest.mark.parametrize("fast", [True, False])
def test_a_file_that_ends_where_a_block_ends_is_read_whole(tmp_path, fast) -> None:
    """A file of exactly the block size, ending in a newline: the read after its last block
    is empty, which was taken for a line longer than the block (the block doubled until
    pyarrow overflowed, and the valid file failed as damaged; found in review)."""
    block = 1 << 16
    lines = UM.read_text().splitlines()
    out, n = lines[0] + "\n", 0
    while len(out) + len(lines[n + 1]) + 1 <= block - 64:
        out += lines[n + 1] + "\n"
        n += 1
    last = lines[n + 1].split(",")
    last[3] += "0" * (block - len(out) - len(",".join(last)) - 1)  # pad quote_qty (not read)
    out += ",".join(last) + "\n"
    path = tmp_path / "BTCUSDT-trades-exact.csv"
    path.write_bytes(out.encode())
    assert path.stat().st_size == block
    cols = rows(path, fast, block=block)[0]
    assert len(cols["trade_id"]) == n + 1
    assert cols["trade_id"].tolist() == [int(ln.split(",")[0]) for ln in lines[1 : n + 2]]


def test_the_columns_are_the_tick_layout_of_the_file() -> None:
    cols = rows(UM, True)[0]
    first = UM.read_text().splitlines()[1].split(",")  # id,price,qty,quote_qty,time,is_buyer_maker
    assert cols["trade_id"][0] == int(first[0]) and cols["price"][0] == float(first[1])
    assert cols["size"][0] == float(first[2]) and cols["ts_ns"][0] == int(first[4]) * 1_000_000
    assert cols["side"][0] == (-1 if first[5] == "true" else 1)


DECIMALS = ("61800.1", "61800", "0.001", "7", "0.1234567", "1234567.7654321", "12345678.5", "0.12345678",
            "123456789012345.6", "9007199254740993", "-1.5", "00012.50", "1.0")
plain = st.tuples(st.integers(0, 10**18 - 1), st.sampled_from(DECIMALS), st.sampled_from(DECIMALS),
                  st.sampled_from(("618.001", "1e3", "x", "", "0")),
                  st.sampled_from((1_723_161_256_519, 1_735_689_600_000_001, 99_999_999_999, 1_600_000_000,
                                   9_300_000_000_000, 1_723_161_256_519_000_001, 0)),
                  st.sampled_from(("true", "false", "True", "False")))
ODD = ("5266583935,61800.1,0.01,618.001,1723161256519",  # a field short
       "5266583935,61800.1,0.01,618.001,1723161256519,true,true,extra",
       "5266583935,,0.01,618.001,1723161256519,true",
       "5266583935,nan,0.01,618.001,1723161256519,true",
       "5266583935,61800.1,inf,618.001,1723161256519,true",
       "5266583935,6.18e4,0.01,618.001,1723161256519,true",
       "5266583935, 61800.1,0.01,618.001,1723161256519,true",
       "5266583935,+61800.1,0.01,618.001,1723161256519,true",
       "5266583935,61_800.1,0.01,618.001,1723161256519,true",
       "-5266583935,61800.1,0.01,618.001,1723161256519,true",
       "5266583935,61800.1,0.01,618.001,-1723161256519,true",
       "5266583935,61800.1,0.01,618.001,99999999999999999999,true",  # beyond int64
       "5266583935,61800.1,0.01,618.001,9300000000000,true",  # ms beyond int64 once in ns
       "5266583935,-0.0,0.01,618.001,1723161256519,true",
       "5266583935,61800.1,0.01,618.001,1723161256519,TRUE",
       "5266583935,61800.1,0.01,618.001,1723161256519,maybe",
       "5266583935,61800.1,0.01,618.€01,1723161256519,true",
       '5266583935,61800.1,0.01,"618.001",1723161256519,true',
       "",
       "garbage")


def text_of(x: object) -> str:
    return x if isinstance(x, str) else ",".join(map(str, x))


@settings(max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(lines=st.lists(st.one_of(plain, plain, plain, st.sampled_from(ODD)), min_size=1, max_size=60),
       best_match=st.booleans(), crlf=st.booleans(), last_newline=st.booleans(),
       block=st.sampled_from((64, 333, None)), gz=st.booleans(), chunk_rows=st.sampled_from((7, 65_536)))
def test_random_files_read_as_the_pyarrow_path_reads_them(tmp_path_factory, lines, best_match, crlf, last_newline,
                                                          block, gz, chunk_rows) -> None:
    """Plain files are memory-mapped, compressed ones streamed; both cut in blocks of ``block``."""
    header = "id,price,qty,quote_qty,time,is_buyer_maker" + (",is_best_match" if best_match else "")
    first = "5266583935,61800.1,0.01,618.001,1723161256519,true" + (",true" if best_match else "")
    body = [text_of(x) + (",true" if best_match and not isinstance(x, str) else "") for x in lines]
    end = "\r\n" if crlf else "\n"
    raw = (end.join([header, first, *body]) + (end if last_newline else "")).encode()
    path = tmp_path_factory.mktemp("trades") / ("BTCUSDT-trades.csv.gz" if gz else "BTCUSDT-trades.csv")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    same(path, chunk_rows=chunk_rows, block=block)


@given(plan=damage_plan, policy=st.sampled_from(["reject", "quarantine"]), chunk_rows=st.sampled_from([7, 65_536]))
@settings(max_examples=60, deadline=None)
def test_damaged_files_are_refused_and_counted_as_on_the_pyarrow_path(plan, policy, chunk_rows) -> None:
    lines, bad, good_ids = build(plan)
    got = []
    for fast in (True, False):
        with tempfile.TemporaryDirectory() as d, \
                mock.patch.object(binance, "PLAIN_MIN_BYTES", 0 if fast else 1 << 62):
            path = write(Path(d), lines, "none")
            q = Path(d) / "q.jsonl"
            replay = Replay([Source(path, policy=policy, quarantine=q if policy == "quarantine" else None)],
                            chunk_rows=chunk_rows)
            ids = np.concatenate([b["trade_id"] for b in replay.iter_arrays(50)] or [np.empty(0, np.int64)])
            assert ids.tolist() == good_ids
            replay.accounting.check()
            counts = replay.accounting.sources[str(path)]
            assert dict(counts.by_reason) == dict(collections.Counter(bad.values()))
            entries = [orjson.loads(x) for x in q.read_bytes().splitlines()] if q.exists() else []
            got.append(([(e["record"], e["reason"], e["raw"], e.get("field"), e.get("value")) for e in entries],
                        counts.read, counts.rejected, counts.quarantined))
    assert got[0] == got[1]


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_each_damage_in_a_fast_block_sends_the_block_to_pyarrow(damage: str, tmp_path: Path) -> None:
    lines, _, _ = build([(5, damage)])
    path = write(tmp_path, lines, "none")
    with mock.patch.object(binance, "PLAIN_MIN_BYTES", 0):
        r = binance_trades(path)
        blk = next(iter(r._blocks()))
        plain = binance_fast.parse_block(blk.data, blk.lines, len(r._names))
    # lines pyarrow converts to a refused value are not plain; backwards times are (the checks refuse them)
    assert (plain is None) == (damage not in ("negative_price", "zero_size", "backwards"))


SIGNAL_DURING_LOAD = """
import os, signal, sys, threading, time
from nautilus_pipeline.io import binance_fast
line = b"123456789,61663.07,0.004,246.65,1723075200123,true\\n"
data = line * 50_000
threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()  # inside the cold compile
t0 = time.perf_counter()
try:
    binance_fast.parse_block(data, 50_000, 6)
except KeyboardInterrupt:
    print(f"interrupted after {time.perf_counter() - t0:.2f} s", flush=True)
    sys.exit(130)
print("parsed before the signal", flush=True)
"""


def test_a_ctrl_c_during_the_parsers_first_load_interrupts_it_cleanly(tmp_path):
    """The first parse of a process compiles the parser (a fresh numba cache here): a
    SIGINT landing meanwhile must interrupt the main thread's wait, not be swallowed inside
    numba's compile callback and printed as an ignored exception (what a `run` interrupted
    during its `bucket_volume = "auto"` pre-read printed on a fresh checkout)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", SIGNAL_DURING_LOAD], env=env, capture_output=True,
                          text=True, timeout=300)
    assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    if proc.returncode == 0:  # a machine that compiled it in 0.3 s: nothing to interrupt
        assert "parsed before the signal" in proc.stdout
    else:
        assert proc.returncode == 130 and "interrupted after" in proc.stdout, (proc.stdout, proc.stderr)


def test_the_first_parse_on_the_main_thread_runs_on_a_helper_and_its_error_comes_back(monkeypatch):
    """How the interrupt above is kept out of numba's compile: the first block parsed on the
    main thread is parsed on a helper thread while the main thread waits (a wait a signal
    interrupts); an exception there is raised in the caller; later blocks run inline."""
    import threading

    seen: list[str] = []

    def parse(data, lines, fields):
        seen.append(threading.current_thread().name)
        if data == b"boom":
            raise ValueError("boom")
        return {"lines": lines}

    monkeypatch.setattr(binance_fast, "_parse_block", parse)
    monkeypatch.setattr(binance_fast, "_loaded", False)
    with pytest.raises(ValueError, match="boom"):
        binance_fast.parse_block(b"boom", 1, 6)
    assert seen == ["binance-parse-load"] and binance_fast._loaded is False
    assert binance_fast.parse_block(b"x", 2, 6) == {"lines": 2}
    assert binance_fast.parse_block(b"x", 3, 6) == {"lines": 3}
    assert seen == ["binance-parse-load", "binance-parse-load", threading.main_thread().name]


def test_a_refused_plain_line_longer_than_the_kept_raw_text_gives_its_record(tmp_path: Path) -> None:
    """A plain line may be longer than the raw text a quarantine entry keeps (an unused field
    of any length): its record is still read from the whole line, as on the pyarrow path."""
    lines = ["id,price,qty,quote_qty,time,is_buyer_maker"]
    for i in range(20):
        quote = "1" * 5000 if i == 7 else "618.001"
        lines.append(f"{5266583935 + i},61800.1,{'0' if i == 7 else '0.01'},{quote},{1723161256519 + i},true")
    path = tmp_path / "BTCUSDT-trades-2024-08-08.csv"
    path.write_text("\n".join(lines) + "\n")
    got = []
    for fast in (True, False):
        q = tmp_path / f"q{fast}.jsonl"
        with mock.patch.object(binance, "PLAIN_MIN_BYTES", 0 if fast else 1 << 62):
            replay = Replay([Source(path, policy="quarantine", quarantine=q)])
            ids = np.concatenate([b["trade_id"] for b in replay.iter_arrays(50)])
        got.append((ids.tolist(), q.read_bytes()))
    assert len(got[0][0]) == 19 and b"size_not_positive" in got[0][1]
    assert got[0] == got[1]


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(whole=st.text("0123456789", min_size=1, max_size=19), frac=st.text("0123456789", max_size=19),
       neg=st.booleans(), time=st.integers(0, 10**18 - 1), maker=st.sampled_from(("true", "false", "True", "False")))
def test_any_decimal_the_parser_takes_is_the_correctly_rounded_float(whole, frac, neg, time, maker) -> None:
    """Price and qty of any length: a line taken is Python's (correctly rounded) float of
    each field, the time in ns as ``convert.to_ns`` scales it; the others are declined."""
    text = ("-" if neg else "") + whole + ("." + frac if frac else "")
    line = f"42,{text},{text},x,{time},{maker}\n".encode()
    cols = [np.empty(1, np.int64), np.empty(1), np.empty(1), np.empty(1, np.int8), np.empty(1, np.int64)]
    got = binance_fast.parse_trades(np.frombuffer(line, np.uint8), 6, binance_fast._POW10, *cols)
    digits = int(whole + frac)
    factor = 10**9 if time < 10**11 else 10**6 if time < 10**14 else 10**3 if time < 10**17 else 1
    plain = len(whole + frac) <= 18 and digits <= 2**53 and not (neg and digits == 0) and time * factor < 2**63
    assert got == (1 if plain else -1)
    if plain:
        value = float(text)
        assert cols[1][0] == cols[2][0] == value and np.signbit(cols[1][0]) == np.signbit(value)
        assert cols[0][0] == time * factor and cols[4][0] == 42 and cols[3][0] == (-1 if maker in ("true", "True") else 1)
