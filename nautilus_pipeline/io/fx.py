"""FX quote files: TrueFX and HistData.com tick CSVs (no sizes: ``bid_size``/``ask_size`` NaN).

- TrueFX as published: no header, ``pair,timestamp,bid,ask`` with ``YYYYMMDD HH:MM:SS.fff``
  (UTC); the symbol is the ``pair`` column. Also accepted: a ``timestamp,bid,ask`` header with
  ISO-8601 times (NautilusTrader's test file); the symbol then comes from ``symbol=`` or the
  file name.
- HistData.com: no header, ``YYYYMMDD HHMMSSmmm,bid,ask,volume``. HistData publishes times
  in EST *without* daylight saving (UTC-5 all year), so 5 h are added to get UTC; ``volume``
  is always 0 and is not read.

Fixed-layout timestamps are parsed vectorised by character position
(:func:`~nautilus_pipeline.io.convert.fixed_layout_ns`), not with ``strptime`` per row.
"""

from __future__ import annotations

from pathlib import Path

from .csv import CsvOptions, CsvReader, sniff_names
from .files import check_file
from .table import FieldMap

EST_TO_UTC_NS = 5 * 3600 * 1_000_000_000
"""HistData's fixed EST (UTC-5, no DST) to UTC."""

HISTDATA_LAYOUT = {"Y": (0, 4), "m": (4, 2), "d": (6, 2), "H": (9, 2), "M": (11, 2), "S": (13, 2), "f": (15, 3)}
TRUEFX_LAYOUT = {"Y": (0, 4), "m": (4, 2), "d": (6, 2), "H": (9, 2), "M": (12, 2), "S": (15, 2), "f": (18, 3)}


def _stem(path: str | Path) -> str:
    return Path(path).name.split(".")[0]


def truefx_quotes(path: str | Path, *, symbol: str | None = None) -> CsvReader:
    """A reader of TrueFX ticks (raw ``pair,timestamp,bid,ask`` or ``timestamp,bid,ask`` ISO)."""
    check_file(path)
    first = sniff_names(path)
    if [f.lower() for f in first[:3]] == ["timestamp", "bid", "ask"]:
        fmap = FieldMap(ts="timestamp", ts_unit="iso", bid="bid", ask="ask", kind="quote")
        return CsvReader(path, fmap, CsvOptions(header=True), symbol=symbol or _stem(path))
    fmap = FieldMap(ts="timestamp", ts_layout=TRUEFX_LAYOUT, bid="bid", ask="ask",
                    symbol=None if symbol else "pair", kind="quote")
    opts = CsvOptions(header=False, column_names=("pair", "timestamp", "bid", "ask"))
    return CsvReader(path, fmap, opts, symbol=symbol)


def histdata_quotes(path: str | Path, *, symbol: str | None = None) -> CsvReader:
    """A reader of HistData.com tick quotes; times converted from fixed EST to UTC."""
    check_file(path)
    fmap = FieldMap(ts="datetime", ts_layout=HISTDATA_LAYOUT, ts_offset_ns=EST_TO_UTC_NS,
                    bid="bid", ask="ask", kind="quote")
    opts = CsvOptions(header=False, column_names=("datetime", "bid", "ask", "volume"))
    return CsvReader(path, fmap, opts, symbol=symbol or _stem(path))
