"""Tardis.dev CSV: ``trades`` and ``quotes`` (header; timestamps µs since the epoch, UTC).

- trades: ``exchange,symbol,timestamp,local_timestamp,id,side,price,amount``; ``side`` is
  buy/sell/unknown (the aggressor). ``id`` is kept as ``trade_id`` only where the exchange's ids
  are integers (Binance, Deribit); string ids (BitMEX UUIDs) become -1, so no duplicate check.
- quotes: ``exchange,symbol,timestamp,local_timestamp,ask_amount,ask_price,bid_price,bid_amount``.

``timestamp`` is the exchange time (``ts_ns``), ``local_timestamp`` Tardis' receive time
(``ts_recv_ns``). The symbol is the file's ``symbol`` column.
"""

from __future__ import annotations

from pathlib import Path

from nautilus_pipeline.io.csv import CsvOptions, CsvReader
from nautilus_pipeline.io.files import check_file, read_head
from nautilus_pipeline.io.table import FieldMap

TRADES_HEADER = ("exchange", "symbol", "timestamp", "local_timestamp", "id", "side", "price", "amount")
QUOTES_HEADER = ("exchange", "symbol", "timestamp", "local_timestamp", "ask_amount", "ask_price", "bid_price", "bid_amount")


def _numeric_ids(path: str | Path) -> bool:
    lines = [ln for ln in read_head(path, 8192).split(b"\n", 64) if ln.strip()]
    if len(lines) < 2:
        return False
    fields = lines[1].decode("utf-8", "replace").split(",")
    return len(fields) > 4 and fields[4].strip().isdigit()


def tardis_trades(path: str | Path, *, symbol: str | None = None) -> CsvReader:
    """A reader of a Tardis.dev ``trades`` CSV (optionally .gz)."""
    check_file(path)
    fmap = FieldMap(ts="timestamp", ts_unit="us", ts_recv="local_timestamp", ts_recv_unit="us",
                    price="price", size="amount", side="side", side_encoding="buy_sell",
                    symbol=None if symbol else "symbol", trade_id="id" if _numeric_ids(path) else None,
                    kind="trade")
    return CsvReader(path, fmap, CsvOptions(header=True), symbol=symbol)


def tardis_quotes(path: str | Path, *, symbol: str | None = None) -> CsvReader:
    """A reader of a Tardis.dev ``quotes`` CSV (optionally .gz)."""
    check_file(path)
    fmap = FieldMap(ts="timestamp", ts_unit="us", ts_recv="local_timestamp", ts_recv_unit="us",
                    bid="bid_price", ask="ask_price", bid_size="bid_amount", ask_size="ask_amount",
                    symbol=None if symbol else "symbol", kind="quote")
    return CsvReader(path, fmap, CsvOptions(header=True), symbol=symbol)
