"""From named columns (pyarrow arrays) to a :class:`TickChunk`: the step CSV, Parquet and JSON
lines share.

A :class:`FieldMap` says which source column holds which tick field and in which unit or
encoding; :func:`arrays_to_chunk` converts one batch, column by column (see ``convert.py``), and
marks rows whose required fields are missing or unparsable instead of failing the batch.
Required fields: ``ts`` always; ``price`` and ``size`` for trades; ``bid`` and ``ask`` for
quotes. A mapped but empty ``side`` is a missing field; a mapped but empty ``trade_id`` or quote
size is simply unknown (-1 / NaN).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields

import numpy as np
import pyarrow as pa

from ..errors import ConfigError
from ..events import KIND_QUOTE, KIND_TRADE
from . import convert
from .chunk import Reason, TickChunk

FIELD_NAMES = ("ts", "ts_recv", "price", "size", "side", "symbol", "trade_id", "bid", "ask", "bid_size", "ask_size")

_TARGET = {"ts": "ts_ns", "ts_recv": "ts_recv_ns", "price": "price", "size": "size", "side": "side",
           "symbol": "symbol_id", "trade_id": "trade_id", "bid": "bid", "ask": "ask",
           "bid_size": "bid_size", "ask_size": "ask_size", "kind": "kind"}


@dataclass(frozen=True)
class FieldMap:
    """Which source column holds each tick field, and its unit/encoding.

    ``kind``: ``"trade"`` or ``"quote"``; by default trades when ``price`` is mapped, else
    quotes; ``kind_column`` instead names a per-row column (0 trade, 1 quote, as this package
    writes files) and then both kinds' fields may be mapped. ``ts_layout``: fixed character positions for timestamps like HistData's
    ``YYYYMMDD HHMMSSmmm`` (see :func:`convert.fixed_layout_ns`), shifted by ``ts_offset_ns``.
    ``price_scale``: multiplier for fixed-point integer prices (e.g. ``1e-9``).
    """

    ts: str
    ts_unit: str = "auto"
    ts_recv: str | None = None
    ts_recv_unit: str = "auto"
    price: str | None = None
    size: str | None = None
    side: str | None = None
    side_encoding: str = "auto"
    symbol: str | None = None
    trade_id: str | None = None
    bid: str | None = None
    ask: str | None = None
    bid_size: str | None = None
    ask_size: str | None = None
    kind: str | None = None
    kind_column: str | None = None
    ts_layout: Mapping[str, tuple[int, int]] | None = None
    ts_offset_ns: int = 0
    price_scale: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in (None, "trade", "quote"):
            raise ConfigError(f"kind {self.kind!r} must be 'trade' or 'quote'")
        if self.ts_unit not in convert.TS_UNITS or self.ts_recv_unit not in convert.TS_UNITS:
            raise ConfigError(f"ts_unit must be one of {convert.TS_UNITS}")
        if self.side_encoding not in convert.SIDE_ENCODINGS:
            raise ConfigError(f"side_encoding must be one of {convert.SIDE_ENCODINGS}")
        if self.kind_column is not None:
            return
        if self.tick_kind == KIND_TRADE and (self.price is None or self.size is None):
            raise ConfigError("a trade mapping needs 'price' and 'size' columns")
        if self.tick_kind == KIND_QUOTE and (self.bid is None or self.ask is None):
            raise ConfigError("a quote mapping needs 'bid' and 'ask' columns (or map 'price' for trades)")

    @property
    def tick_kind(self) -> int:
        if self.kind is None:
            return KIND_TRADE if self.price is not None else KIND_QUOTE
        return KIND_TRADE if self.kind == "trade" else KIND_QUOTE

    def columns(self) -> dict[str, str]:
        """Tick field -> source column, for the mapped fields."""
        cols = {f: getattr(self, f) for f in FIELD_NAMES if getattr(self, f) is not None}
        if self.kind_column is not None:
            cols["kind"] = self.kind_column
        return cols

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> FieldMap:
        """Build from a pipeline definition table; unknown keys are a ConfigError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown column-mapping keys {unknown}; known: {sorted(known)}")
        return cls(**d)  # type: ignore[arg-type]


def arrays_to_chunk(
    source: str,
    arrays: Mapping[str, pa.Array],
    fmap: FieldMap,
    records: np.ndarray,
    *,
    symbol: str | None,
    raw: Callable[[int], object] | None,
) -> TickChunk:
    """Convert one batch (``arrays`` keyed by tick field name) to a chunk with per-row verdicts."""
    n = len(records)
    cols: dict[str, np.ndarray] = {}
    reason = np.zeros(n, dtype=np.uint8)
    bad_field: dict[int, str] = {}
    if fmap.kind_column is not None:
        kind_arr, kmissing, kbad = convert.to_int(arrays["kind"], -1)
        kinds = kind_arr.astype(np.uint8)
    else:
        kinds = np.full(n, fmap.tick_kind, dtype=np.uint8)
    trade_rows = kinds == KIND_TRADE
    quote_rows = ~trade_rows
    need = {"ts": None, "price": trade_rows, "size": trade_rows, "bid": quote_rows, "ask": quote_rows}
    if fmap.side is not None:
        need["side"] = trade_rows
    mapping = fmap.columns()

    def mark(mask: np.ndarray, why: Reason, fld: str) -> None:
        m = mask & (reason == 0)
        if m.any():
            reason[m] = why
            col = mapping.get(fld, fld)
            for i in np.flatnonzero(m).tolist():
                bad_field[i] = col

    symbols = [symbol or ""]
    if fmap.kind_column is not None:
        mark(kmissing, Reason.MISSING_FIELD, "kind")
        mark(kbad | ((kind_arr != KIND_TRADE) & (kind_arr != KIND_QUOTE) & ~kmissing), Reason.UNPARSABLE, "kind")
    for fld, arr in arrays.items():
        if fld == "kind":
            continue
        if fld == "symbol":
            codes, names, missing = convert.symbol_codes(arr)
            cols["symbol_id"], symbols = codes, names
            mark(missing, Reason.MISSING_FIELD, fld)
            continue
        if fld == "ts" or fld == "ts_recv":
            unit = fmap.ts_unit if fld == "ts" else fmap.ts_recv_unit
            if fld == "ts" and fmap.ts_layout is not None:
                vals, missing, unparsable = convert.fixed_layout_ns(arr, dict(fmap.ts_layout), fmap.ts_offset_ns)
            else:
                vals, missing, unparsable = convert.to_ns(arr, unit)
            if fld == "ts_recv":
                vals = np.where(missing, -1, vals)
        elif fld == "side":
            vals, missing, unknown = convert.to_side(arr, fmap.side_encoding)
            mark(missing & trade_rows, Reason.MISSING_FIELD, fld)
            mark(unknown, Reason.UNKNOWN_SIDE, fld)
            cols["side"] = vals
            continue
        elif fld == "trade_id":
            vals, missing, unparsable = convert.to_int(arr, -1)
        else:
            scale = fmap.price_scale if fld in ("price", "bid", "ask") else None
            vals, missing, unparsable = convert.to_float(arr, scale)
        if fld in need:
            rows = need[fld]
            mark(missing if rows is None else missing & rows, Reason.MISSING_FIELD, fld)
        mark(unparsable, Reason.UNPARSABLE, fld)
        cols[_TARGET[fld]] = vals
    cols["kind"] = kinds
    if "symbol_id" not in cols:
        cols["symbol_id"] = np.zeros(n, dtype=np.uint32)
    field_map = {_TARGET[f]: c for f, c in mapping.items()}
    return TickChunk(source, cols, records, symbols, bad=reason if bad_field else None,
                     bad_field=bad_field, field_map=field_map, raw=raw)


_SIDE_WORDS = {"buy/sell": "buy_sell", "b/s": "buy_sell", "sign": "sign", "1/-1": "sign", "+1/-1": "sign",
               "maker": "is_buyer_maker", "is_buyer_maker": "is_buyer_maker", "buyer_maker": "is_buyer_maker"}


def mapping_from_text(text: str) -> dict[str, object]:
    """A column mapping from the command line's ``--map``: ``field=column[:option],...``.

    ``ts=time:ms`` maps ``ts`` to column ``time`` in ms (``ts_recv`` likewise: the option is the
    unit, s/ms/us/ns/auto); ``side=side:buy/sell`` names the side encoding (``buy/sell``,
    ``sign``, ``maker`` for is_buyer_maker, or an encoding name); other fields take a column
    (``price=px``); keys of :class:`FieldMap` that are not fields take a value (``kind=quote``).
    """
    out: dict[str, object] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise ConfigError(f"--map {text!r}: {part!r} is not field=column (e.g. ts=time:ms,price=px,size=qty)")
        column, colon, option = value.partition(":")
        if key in ("ts", "ts_recv") and colon:
            out[key], out[f"{key}_unit"] = column, option
        elif key == "side" and colon:
            out["side"], out["side_encoding"] = column, _SIDE_WORDS.get(option.lower(), option)
        else:
            out[key] = value
    if not out:
        raise ConfigError("--map is empty; give field=column pairs, e.g. ts=time:ms,price=px,size=qty")
    FieldMap.from_dict(out)  # unknown keys and missing ts are refused here, naming them
    return out
