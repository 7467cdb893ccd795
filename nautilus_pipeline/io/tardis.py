"""Tardis.dev CSV: ``trades`` and ``quotes`` (header; timestamps µs since the epoch, UTC).

- trades: ``exchange,symbol,timestamp,local_timestamp,id,side,price,amount``; ``side`` is
  buy/sell/unknown (the aggressor). ``id`` is kept as ``trade_id`` only where the exchange's ids
  are integers (Binance, Deribit); string ids (BitMEX UUIDs) become -1, so no duplicate check.
- quotes: ``exchange,symbol,timestamp,local_timestamp,ask_amount,ask_price,bid_price,bid_amount``.

``timestamp`` is the exchange time (``ts_ns``), ``local_timestamp`` Tardis' receive time
(``ts_recv_ns``). The symbol is the file's ``symbol`` column.

Units. Tardis writes µs, but exports made by other tools do not always (NautilusTrader's test
data has a Tardis trades file in ns, which read as µs would overflow int64 and wrap to 1862).
So the unit of each timestamp column is taken from the magnitude of its first value (a time
after 1973 is >= 1e17 in ns, >= 1e14 in µs, >= 1e11 in ms) and then holds for the file: a
row whose value does not fit that unit is refused as unparsable, never wrapped.
"""

from __future__ import annotations

from pathlib import Path

from .csv import CsvOptions, CsvReader
from .files import check_file, check_text, read_head
from .table import FieldMap

TRADES_HEADER = ("exchange", "symbol", "timestamp", "local_timestamp", "id", "side", "price", "amount")
QUOTES_HEADER = ("exchange", "symbol", "timestamp", "local_timestamp", "ask_amount", "ask_price", "bid_price", "bid_amount")


def _first_row(path: str | Path) -> list[str]:
    check_text(path)
    lines = [ln for ln in read_head(path, 8192).split(b"\n", 64) if ln.strip()]
    return lines[1].decode("utf-8", "replace").strip().split(",") if len(lines) > 1 else []


def _numeric_ids(row: list[str]) -> bool:
    return len(row) > 4 and row[4].strip().isdigit()


def unit_of(value: str) -> str:
    """``ns``/``us``/``ms``/``s`` from the magnitude of one epoch timestamp (``us`` if unreadable)."""
    try:
        mag = abs(int(value.strip()))
    except ValueError:
        return "us"
    return "ns" if mag >= 10**17 else "us" if mag >= 10**14 else "ms" if mag >= 10**11 else "s"


def _units(row: list[str]) -> dict[str, str]:
    return {"ts_unit": unit_of(row[2]) if len(row) > 2 else "us",
            "ts_recv_unit": unit_of(row[3]) if len(row) > 3 else "us"}


def tardis_trades(path: str | Path, *, symbol: str | None = None) -> CsvReader:
    """A reader of a Tardis.dev ``trades`` CSV (optionally .gz)."""
    check_file(path)
    row = _first_row(path)
    fmap = FieldMap(ts="timestamp", ts_recv="local_timestamp", **_units(row),
                    price="price", size="amount", side="side", side_encoding="buy_sell",
                    symbol=None if symbol else "symbol", trade_id="id" if _numeric_ids(row) else None,
                    kind="trade")
    return CsvReader(path, fmap, CsvOptions(header=True), symbol=symbol)


def tardis_quotes(path: str | Path, *, symbol: str | None = None) -> CsvReader:
    """A reader of a Tardis.dev ``quotes`` CSV (optionally .gz)."""
    check_file(path)
    fmap = FieldMap(ts="timestamp", ts_recv="local_timestamp", **_units(_first_row(path)),
                    bid="bid_price", ask="ask_price", bid_size="bid_amount", ask_size="ask_amount",
                    symbol=None if symbol else "symbol", kind="quote")
    return CsvReader(path, fmap, CsvOptions(header=True), symbol=symbol)
