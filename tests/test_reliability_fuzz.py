"""Fuzzing every reader and the TOML loader with damaged copies of the bundled real files.

Damage (hypothesis): truncation, bit flips, bytes overwritten (quotes, carriage returns, NULs,
delimiters, newlines, anything), garbage inserted, bytes deleted, a field replaced by a number
edge case (``1e309``, ``-0``, ``9223372036854775808``, ``nan``, ``1_000``, ...), a line of up to
3 MiB, the file re-encoded (UTF-16/32, Latin-1, a UTF-8 byte-order mark), then stored plain,
gzip'ed or zstd'ed. Binary formats (Parquet, DBN) get the byte-level damage only.

Invariants, for every case:

- only the project's own errors escape (``PipelineError``; never a parser's exception);
- rows delivered + refused = rows in the file, wherever they can be counted (data lines of a
  CSV after its header; non-blank lines of JSON lines, ``ignored`` included for feed captures;
  the Parquet metadata's row count), and ``read = delivered + rejected`` always;
- no bad row is delivered (finite positive prices and sizes, uncrossed quotes, time order
  and unique trade ids per symbol, known kinds and sides);
- no case runs longer than :data:`CASE_SECONDS` (a timer interrupts it and fails the test).

Two profiles. The short one runs with the suite (``python -m pytest -q``): a few dozen cases
per reader, derandomized so CI is repeatable. The long one (>= 10,000 cases in all) is marked
``fuzz`` and deselected by default (``addopts`` in ``pyproject.toml``); run it with

    python -m pytest -m fuzz -q tests/test_reliability_fuzz.py

(``NP_FUZZ_SCALE=2`` doubles its cases).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import signal
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nautilus_pipeline import config
from nautilus_pipeline.errors import PipelineError
from nautilus_pipeline.io import Replay, Source, open_reader
from nautilus_pipeline.io.jsonl import write_jsonl

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "nautilus_pipeline" / "data"
CASE_SECONDS = 30.0
SHORT = 25  # cases per reader in the suite
LONG = int(700 * float(os.environ.get("NP_FUZZ_SCALE", "1")))  # per reader under -m fuzz: 15 x 700 > 10,000


# --- the samples -----------------------------------------------------------------------
def _lines(name: str, n: int) -> bytes:
    data = (DATA / name).read_bytes()
    if name.endswith(".gz"):
        data = gzip.decompress(data)
    return b"\n".join(data.split(b"\n")[:n]) + b"\n"


def _own_jsonl() -> bytes:
    r = Replay([Source(DATA / "binance-um-btcusdt-trades-20240808.csv", format="binance_trades")])
    block = next(r.iter_arrays(200))
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "t.jsonl"
        write_jsonl(p, block, r.symbols.names)
        return p.read_bytes()


def _dbn(name: str) -> bytes:
    import io

    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO((DATA / name).read_bytes()), read_across_frames=True) as r:
        return r.read()


@dataclass(frozen=True)
class Sample:
    fmt: str
    name: str  # file name (the symbol of single-symbol files comes from it)
    data: Callable[[], bytes]
    text: bool = True
    options: dict | None = None


SAMPLES: dict[str, Sample] = {
    "binance_um": Sample("binance_trades", "BTCUSDT-trades-2024-08-08.csv", lambda: _lines("binance-um-btcusdt-trades-20240808.csv", 400)),
    "binance_spot": Sample("binance_trades", "ETHUSDT-trades-2024-08-08.csv", lambda: _lines("binance-spot-ethusdt-trades-20240808.csv", 400)),
    "tardis_trades": Sample("tardis_trades", "trades.csv", lambda: (DATA / "tardis-bitmex-xbtusd-trades.csv").read_bytes()),
    "tardis_quotes": Sample("tardis_quotes", "quotes.csv", lambda: (DATA / "tardis-huobi-btcusd-quotes.csv").read_bytes()),
    "truefx": Sample("truefx", "USDJPY.csv", lambda: _lines("truefx-usdjpy-quotes.csv", 300)),
    "histdata": Sample("histdata", "EURUSD.csv", lambda: _lines("histdata-eurusd-quotes.csv", 300)),
    "generic_csv": Sample("csv", "BTCUSDT.csv", lambda: _lines("binance-um-btcusdt-trades-20240808.csv", 300),
                          options={"mapping": {"ts": "time", "ts_unit": "ms", "price": "price", "size": "qty",
                                               "side": "is_buyer_maker", "side_encoding": "is_buyer_maker",
                                               "trade_id": "id"}}),
    "feed": Sample("binance_feed", "feed.jsonl", lambda: _lines("binance-feed-spot-ethusdt_20240808.jsonl.gz", 400)),
    "jsonl": Sample("jsonl", "BTCUSDT.jsonl", _own_jsonl),
    "parquet_trades": Sample("parquet", "trades.parquet", lambda: (DATA / "nautilus-binance-btcusdt-trades.parquet").read_bytes(), text=False),
    "parquet_quotes": Sample("parquet", "quotes.parquet", lambda: (DATA / "nautilus-binance-btcusdt-quotes.parquet").read_bytes(), text=False),
    "dbn_trades": Sample("databento", "trades.dbn", lambda: _dbn("databento-glbx-futures-trades-20240701.dbn.zst"), text=False),
    "dbn_mbp1": Sample("databento", "mbp1.dbn", lambda: _dbn("databento-glbx-futures-mbp1-20240701.dbn.zst"), text=False),
}
_CACHE: dict[str, bytes] = {}


def sample_bytes(key: str) -> bytes:
    if key not in _CACHE:
        _CACHE[key] = SAMPLES[key].data()
    return _CACHE[key]


# --- damage --------------------------------------------------------------------------------
EDGE_NUMBERS = [b"1e309", b"-1e309", b"-0", b"0", b"nan", b"NaN", b"inf", b"-inf", b"9223372036854775807",
                b"9223372036854775808", b"-9223372036854775809", b"18446744073709551616", b"1e-400", b"0x10",
                b"1_000", b"  5", b"5  ", b"+5", b".", b"-", b"", b"00000000000000000000001", b"1.5e3",
                b"99999999999999999999999999", b"1e19", b"-1", b"true", b"\"5\"", b"5\"", b"\xff", b"\xc3\xa9"]
SPECIAL = [0x22, 0x0D, 0x0A, 0x00, 0xFF, 0x2C, 0x20, 0x7B, 0x7D, 0x5C, 0x09, 0x80]


@st.composite
def damage(draw, text: bool) -> list[tuple]:
    ops = []
    for _ in range(draw(st.integers(1, 3))):
        kinds = ["flip", "set", "insert", "delete", "truncate"]
        if text:
            kinds += ["field", "field", "huge", "encode"]
        kind = draw(st.sampled_from(kinds))
        at = draw(st.floats(0, 1, allow_nan=False))
        if kind == "flip":
            ops.append((kind, at, draw(st.integers(0, 7))))
        elif kind == "set":
            ops.append((kind, at, draw(st.one_of(st.sampled_from(SPECIAL), st.integers(0, 255)))))
        elif kind == "insert":
            ops.append((kind, at, draw(st.binary(min_size=1, max_size=40))))
        elif kind == "delete":
            ops.append((kind, at, draw(st.integers(1, 200))))
        elif kind == "truncate":
            ops.append((kind, at))
        elif kind == "field":
            ops.append((kind, at, draw(st.integers(0, 9)), draw(st.sampled_from(EDGE_NUMBERS))))
        elif kind == "huge":
            ops.append((kind, at, draw(st.sampled_from([1 << 10, (1 << 20) + 7, 3 << 20]))))
        else:
            ops.append((kind, draw(st.sampled_from(["utf-16", "utf-16-le", "utf-32", "latin-1", "utf-8-sig"]))))
    return ops


def apply(data: bytes, ops: list[tuple]) -> bytes:
    b = bytearray(data)
    for op in ops:
        kind = op[0]
        pos = min(int(op[1] * len(b)), max(len(b) - 1, 0)) if kind != "encode" else 0
        if kind == "flip" and b:
            b[pos] ^= 1 << op[2]
        elif kind == "set" and b:
            b[pos] = op[2]
        elif kind == "insert":
            b[pos:pos] = op[2]
        elif kind == "delete":
            del b[pos : pos + op[2]]
        elif kind == "truncate":
            del b[pos:]
        elif kind == "field":
            lines = bytes(b).split(b"\n")
            i = min(int(op[1] * len(lines)), len(lines) - 1)
            fields = lines[i].split(b",")
            fields[op[2] % len(fields)] = op[3]
            lines[i] = b",".join(fields)
            b = bytearray(b"\n".join(lines))
        elif kind == "huge":
            cut = bytes(b).rfind(b"\n", 0, pos) + 1
            b[cut:cut] = (b"7," * (op[2] // 2))[: op[2]] + b"\n"
        elif kind == "encode":
            text = bytes(b).decode("utf-8", "replace")
            b = bytearray(("é" + text if op[1] == "latin-1" else text).encode(op[1], "replace"))
    return bytes(b)


def pack(data: bytes, codec: str) -> bytes:
    if codec == "gzip":
        return gzip.compress(data, compresslevel=1)
    if codec == "zstd":
        return zstandard.ZstdCompressor(level=1).compress(data)
    return data


# --- invariants ------------------------------------------------------------------------------
class Hang(Exception):
    pass


@contextlib.contextmanager
def time_bound(seconds: float):
    def alarm(signum, frame):
        raise Hang(f"a case ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_delivered(cols: dict[str, np.ndarray], order_by: str) -> None:
    """No bad row among the delivered ones."""
    if not cols:
        return
    kind, side = cols["kind"], cols["side"]
    assert np.isin(kind, (0, 1)).all() and np.isin(side, (-1, 0, 1)).all()
    t = kind == 0
    q = ~t
    with np.errstate(invalid="ignore"):
        assert (np.isfinite(cols["price"][t]) & (cols["price"][t] > 0)).all(), "bad price delivered"
        assert (np.isfinite(cols["size"][t]) & (cols["size"][t] > 0)).all(), "bad size delivered"
        bid, ask = cols["bid"][q], cols["ask"][q]
        assert (np.isfinite(bid) & np.isfinite(ask) & (bid > 0) & (ask > 0) & (bid <= ask)).all(), "bad quote delivered"
        for s in ("bid_size", "ask_size"):
            v = cols[s][q]
            assert (np.isnan(v) | (np.isfinite(v) & (v >= 0))).all(), "bad quote size delivered"
    key = cols[order_by]
    for sym in np.unique(cols["symbol_id"]):
        mine = cols["symbol_id"] == sym
        assert (np.diff(key[mine]) >= 0).all(), "time going backwards delivered"
        ids = cols["trade_id"][mine & t]
        ids = ids[ids >= 0]
        assert len(np.unique(ids)) == len(ids), "duplicate trade id delivered"


def expected_rows(key: str, data: bytes, path: Path) -> int | None:
    """Rows the file holds, where they can be counted without the reader (None: not counted)."""
    s = SAMPLES[key]
    if s.fmt == "parquet":
        try:
            return pq.ParquetFile(path).metadata.num_rows
        except Exception:
            return None
    if s.fmt == "databento":
        return None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if s.fmt in ("jsonl", "binance_feed"):
        return sum(1 for ln in data.split(b"\n") if ln.rstrip(b"\r").strip())
    lines = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
    reader = open_reader(path, format=s.fmt, **(s.options or {}))
    return lines - reader._header_line


def run_case(key: str, ops: list[tuple], codec: str, tmp: Path) -> None:
    s = SAMPLES[key]
    data = apply(sample_bytes(key), ops)
    path = tmp / (s.name + {"none": "", "gzip": ".gz", "zstd": ".zst"}[codec])
    path.write_bytes(pack(data, codec))
    src = Source(path, format=s.fmt, policy="reject", options=s.options or {})
    with time_bound(CASE_SECONDS):
        try:
            r = Replay([src], chunk_rows=128)
            blocks = list(r.iter_arrays(97))
        except PipelineError:
            return  # refused with our own error: allowed (the message is checked elsewhere)
        cols = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]} if blocks else {}
        total = r.accounting.total
        assert total.read == total.delivered + total.rejected, total
        assert total.delivered == (len(cols["ts_ns"]) if cols else 0)
        check_delivered(cols, "ts_recv_ns" if s.fmt == "binance_feed" else "ts_ns")
        try:
            expected = expected_rows(key, data, path)
        except PipelineError:
            expected = None
        if expected is not None:
            ignored = sum(r.accounting.ignored.values())
            assert total.read + (ignored if s.fmt == "binance_feed" else 0) == expected, (total, ignored, expected)


def _reader_test(key: str, examples: int, derandomize: bool):
    text = SAMPLES[key].text

    @settings(max_examples=examples, deadline=None, derandomize=derandomize, database=None,
              suppress_health_check=list(HealthCheck))
    @given(ops=damage(text), codec=st.sampled_from(["none", "none", "gzip", "zstd"]))
    def test(tmp_path_factory, ops, codec):
        run_case(key, ops, codec, tmp_path_factory.mktemp(key))

    return test


for _key in SAMPLES:
    globals()[f"test_fuzz_{_key}"] = _reader_test(_key, SHORT, True)
    globals()[f"test_fuzz_{_key}_long"] = pytest.mark.fuzz(_reader_test(_key, LONG, False))


# --- the TOML loader ---------------------------------------------------------------------------
DEFINITIONS = [p.read_text() for p in sorted((REPO / "pipelines").glob("*.toml"))]
VALUES = st.one_of(st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=True), st.text(max_size=12), st.booleans(),
                   st.lists(st.one_of(st.integers(-5, 5), st.floats(-2, 2), st.text(max_size=4)), max_size=4),
                   st.sampled_from([0, -1, 1, 2**40, 1e10, 1.5, -1e-9, "auto", "inf", [], [1.5], ["a"], {"X": 1.0}]))


@st.composite
def definition_text(draw) -> str:
    text = draw(st.sampled_from(DEFINITIONS))
    if draw(st.booleans()):  # change values through the parsed tree, so the TOML stays valid
        tree = tomllib.loads(text)
        tables = [tree.get("pipeline", {}), tree.get("replay", {}), tree.get("outputs", {}),
                  *tree.get("stages", []), *tree.get("sources", [])]
        for _ in range(draw(st.integers(1, 4))):
            table = draw(st.sampled_from([t for t in tables if isinstance(t, dict)]))
            keys = [*table, "batch_size", "bucket_volume", "half_lives", "var_levels", "symbols", "window"]
            table[draw(st.sampled_from(keys))] = draw(VALUES)
        return _to_toml(tree)
    return apply(text.encode(), draw(damage(True))).decode("utf-8", "replace")


def _to_toml(tree: dict) -> str:
    out = []

    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return "nan" if v != v else ("inf" if v == float("inf") else "-inf" if v == float("-inf") else repr(v))
        if isinstance(v, int):
            return str(v)
        if isinstance(v, str):
            return orjson.dumps(v).decode()
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{orjson.dumps(str(k)).decode()} = {value(x)}" for k, x in v.items()) + " }"
        raise TypeError(type(v))

    for name, t in tree.items():
        if isinstance(t, dict):
            out.append(f"[{name}]")
            out += [f"{orjson.dumps(k).decode()} = {value(v)}" for k, v in t.items()]
        elif isinstance(t, list) and all(isinstance(x, dict) for x in t):
            for x in t:
                out.append(f"[[{name}]]")
                out += [f"{orjson.dumps(k).decode()} = {value(v)}" for k, v in x.items()]
        else:
            out.insert(0, f"{orjson.dumps(name).decode()} = {value(t)}")
    return "\n".join(out) + "\n"


def run_definition(text: str, tmp: Path) -> None:
    with time_bound(CASE_SECONDS):
        try:
            d = config.loads(text, tmp / "fuzz.toml")
            sources = config.make_sources(d, None, tmp)
            stages = config.build_stages(d, sources)
            config.build_pipeline(d, stages)
        except PipelineError:
            pass


def _toml_test(examples: int, derandomize: bool):
    @settings(max_examples=examples, deadline=None, derandomize=derandomize, database=None,
              suppress_health_check=list(HealthCheck))
    @given(text=definition_text())
    def test(tmp_path_factory, text):
        run_definition(text, tmp_path_factory.mktemp("toml"))

    return test


test_fuzz_definitions = _toml_test(SHORT * 2, True)
test_fuzz_definitions_long = pytest.mark.fuzz(_toml_test(LONG * 2, False))
