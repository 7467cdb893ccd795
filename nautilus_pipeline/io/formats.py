"""Format registry: detect a tick file's format, and open the right reader for a :class:`Source`.

``detect_format(path)`` looks at magic bytes and the first decompressed line, then the name:

=====================  ======================================================================
format                 recognised by
=====================  ======================================================================
``parquet``            ``PAR1`` magic
``arrow``              ``ARROW1`` (Arrow IPC file, Feather v2), ``FEA1`` (Feather v1), IPC stream
``databento``          ``DBN`` magic (after zstd), or ``.dbn``/``.dbn.zst``
``binance_feed``       first line ``<16-20 digit ns> {json}``
``jsonl``              first line starts with ``{``
``json``               the text starts with ``[`` (a JSON array of objects)
``tardis_trades``      Tardis ``trades`` header
``tardis_quotes``      Tardis ``quotes`` header
``tardis_book_l2``     Tardis ``incremental_book_L2`` header (book rows)
``tardis_book_snapshot`` Tardis ``book_snapshot_N`` header (book rows)
``truefx``             ``timestamp,bid,ask`` header, or ``PAIR,YYYYMMDD HH:MM:SS.fff,bid,ask``
``histdata``           ``YYYYMMDD HHMMSSmmm,bid,ask,volume``
``lobster``            a LOBSTER ``..._message_N.csv`` name, or its 6-field rows (time, type 1-7, ...)
``binance_trades``     numeric id, 6-7 fields, ``true``/``false`` in field 6 (header optional)
``binance_agg_trades`` numeric id, 7-8 fields, ``true``/``false`` in field 7
``csv``                anything else with a header: needs a column mapping
=====================  ======================================================================

Containers (``io/files.py``): ``.gz``, ``.zst``, ``.bz2`` and one-file ``.zip`` are opened by
their magic bytes and the format is detected inside. Others (xz, 7z, rar, tar, ...) and
binary data that is none of the formats are refused as "unrecognised container", naming it.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from .arrow import ARROW_FILE_MAGIC, FEATHER_V1_MAGIC, IPC_STREAM_MAGIC, ArrowReader
from .binance import BinanceFeedReader, binance_agg_trades, binance_trades
from .checks import Accounting, Policy, Validator
from .chunk import TickReader
from .csv import CsvOptions, CsvReader
from .databento import DatabentoReader
from .files import check_file, compression_of, read_head, unsupported_container, wide_encoding
from .fx import histdata_quotes, truefx_quotes
from .jsonl import JsonArrayReader, JsonLinesReader
from .lobster import LobsterReader, looks_like_lobster
from .parquet import ParquetReader
from .table import FieldMap
from .tardis import QUOTES_HEADER, TRADES_HEADER, tardis_quotes, tardis_trades
from .tardis_book import (
    INCREMENTAL_HEADER,
    snapshot_depth,
    tardis_book_snapshot,
    tardis_incremental_book,
)

_BOOL = {"true", "false"}


def _generic_csv(path: str | Path, *, symbol: str | None = None, mapping: FieldMap | Mapping[str, Any] | None = None,
                 header: bool = True, column_names: tuple[str, ...] | None = None, delimiter: str = ",") -> CsvReader:
    if mapping is None:
        from .csv import sniff_names

        raise ConfigError(
            f"{path}: a generic CSV needs a column mapping (ts, price, size, side, ... or bid, ask); "
            f"its first line is {sniff_names(path, delimiter)}. Give it in a pipeline definition: "
            '[[sources]] options = { mapping = { ts = "...", price = "...", size = "..." } } '
            "(pipelines/README.md lists the keys)"
        )
    fmap = mapping if isinstance(mapping, FieldMap) else FieldMap.from_dict(mapping)
    names = tuple(column_names) if column_names is not None else None
    return CsvReader(path, fmap, CsvOptions(header=header, column_names=names, delimiter=delimiter), symbol=symbol)


def _with_mapping(cls: Callable[..., TickReader]) -> Callable[..., TickReader]:
    def make(path: str | Path, *, symbol: str | None = None, mapping: FieldMap | Mapping[str, Any] | None = None) -> TickReader:
        fmap = mapping if isinstance(mapping, FieldMap) or mapping is None else FieldMap.from_dict(mapping)
        return cls(path, fmap, symbol=symbol)

    return make


READERS: dict[str, Callable[..., TickReader]] = {
    "csv": _generic_csv,
    "binance_trades": binance_trades,
    "binance_agg_trades": binance_agg_trades,
    "binance_feed": BinanceFeedReader,
    "tardis_trades": tardis_trades,
    "tardis_quotes": tardis_quotes,
    "tardis_book_l2": tardis_incremental_book,
    "tardis_book_snapshot": tardis_book_snapshot,
    "databento": DatabentoReader,
    "parquet": _with_mapping(ParquetReader),
    "jsonl": _with_mapping(JsonLinesReader),
    "json": _with_mapping(JsonArrayReader),
    "lobster": LobsterReader,
    "arrow": _with_mapping(ArrowReader),
    "truefx": truefx_quotes,
    "histdata": histdata_quotes,
}
"""Format name -> reader factory ``(path, *, symbol=None, **options)``."""

DEFAULT_ORDER_BY: dict[str, str] = {"binance_feed": "ts_recv_ns"}
"""Replay clock per format where it is not the event time ``ts_ns`` (see ``binance.py``)."""


_CONTROL = bytes(b for b in range(32) if b not in b"\t\n\r")


def _binary(sample: bytes) -> bool:
    """Binary data, not text: a tenth or more of control bytes and bytes that are not UTF-8
    (a text tick file has none; a damaged one a few)."""
    if len(sample) < 16:
        return False
    control = len(sample) - len(sample.translate(None, _CONTROL))
    not_utf8 = sample[:-4].decode("utf-8", "replace").count("\ufffd")
    return (control + not_utf8) * 10 >= len(sample)


def detect_format(path: str | Path) -> str:
    """The format name of a tick file (see the module table); DataError when it is none of them."""
    p = check_file(path)
    with open(p, "rb") as fh:
        magic = fh.read(8)
    if magic[:4] == b"PAR1":
        return "parquet"
    if magic.startswith((ARROW_FILE_MAGIC, FEATHER_V1_MAGIC)):
        return "arrow"
    other = unsupported_container(p)
    if other is not None:
        raise DataError(f"{p}: unrecognised container {other}; decompress or unpack it first "
                        "(read directly: gzip, zstd, bzip2 and one-file zip)")
    head = read_head(p, 65_536)
    if head.startswith(b"DBN") or p.name.endswith((".dbn", ".dbn.zst")):
        return "databento"
    if head.startswith(IPC_STREAM_MAGIC) and len(head) > 8:
        return "arrow"
    if head.startswith((b"PAR1", ARROW_FILE_MAGIC)) and compression_of(p) is not None:
        raise DataError(f"{p}: a {'Parquet' if head.startswith(b'PAR1') else 'Arrow'} file inside a "
                        f"{compression_of(p)} container; these need random access: decompress it first")
    if _binary(head[:4096]) and wide_encoding(head) is None:
        raise DataError(f"{p}: unrecognised container (binary data, first bytes {bytes(magic)!r}); "
                        "not a tick format or compression this package reads")
    if head.lstrip()[:1] == b"[":
        return "json"
    lines = [ln.strip(b"\r") for ln in head.split(b"\n", 64) if ln.strip()]
    if not lines:
        raise DataError(f"{p}: no lines to recognise a format from (empty after decompression)")
    first = lines[0].decode("utf-8", "replace").strip()
    if re.match(r"^\d{16,20} \{", first):
        return "binance_feed"
    if first.startswith("{"):
        return "jsonl"
    fields = [f.strip().strip('"') for f in first.split(",")]
    low = [f.lower() for f in fields]
    if tuple(low) == TRADES_HEADER:
        return "tardis_trades"
    if tuple(low) == QUOTES_HEADER:
        return "tardis_quotes"
    if tuple(low) == INCREMENTAL_HEADER:
        return "tardis_book_l2"
    if snapshot_depth(fields) is not None:
        return "tardis_book_snapshot"
    if low[:3] == ["timestamp", "bid", "ask"] or (len(fields) == 4 and re.match(r"^\d{8} \d\d:\d\d:\d\d", fields[1])):
        return "truefx"
    if len(fields) == 4 and re.match(r"^\d{8} \d{9}$", fields[0]):
        return "histdata"
    if looks_like_lobster(p, fields):
        return "lobster"
    data = fields
    if not fields[0].lstrip("-").isdigit() and len(lines) > 1:
        data = [f.strip() for f in lines[1].decode("utf-8", "replace").split(",")]
    if data and data[0].isdigit():
        flags = [f.lower() in _BOOL for f in data]
        if len(data) in (6, 7) and flags[5]:
            return "binance_trades"
        if len(data) in (7, 8) and flags[6] and not flags[5]:
            return "binance_agg_trades"
    if p.name.endswith((".csv", ".csv.gz", ".csv.zst", ".txt")) or len(fields) > 1:
        return "csv"
    raise DataError(f"{p}: unrecognised tick format (first line {first[:80]!r}); pass format= explicitly (one of {sorted(READERS)})")


@dataclass
class Source:
    """One tick file in a replay, with its format, policy and replay clock.

    ``format`` None: detected. ``symbol``: the name for single-symbol files (default from the
    file or its name); sources with the same symbol name share a ``symbol_id``. ``order_by``:
    ``ts_ns`` (event time) or ``ts_recv_ns``; default: the reader's ``default_order_by`` where it
    has one (DBN: receive time for venues with non-monotonic event times), else per format
    (:data:`DEFAULT_ORDER_BY`).
    ``quarantine``: side file for policy ``quarantine``. ``options``: reader keywords
    (``mapping=`` for generic CSV/Parquet/JSONL, ``trades=True`` for DBN MBP-1, ...).
    ``name``: key in the accounting (default: the path). ``symbols_allowed``: when given,
    rows of other symbols are bad rows (``UNKNOWN_SYMBOL``) under the source's policy.
    """

    path: str | Path
    format: str | None = None
    symbol: str | None = None
    policy: Policy | str = Policy.FAIL
    quarantine: str | Path | None = None
    allow_equal_ts: bool = True
    order_by: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    name: str | None = None
    symbols_allowed: Iterable[str] | None = None

    def __post_init__(self) -> None:
        self.policy = Policy.parse(self.policy)
        if self.format is not None and self.format not in READERS:
            raise ConfigError(f"source {self.path}: format {self.format!r} is not one of {sorted(READERS)}")

    @property
    def key(self) -> str:
        return self.name or str(self.path)

    def resolved_format(self) -> str:
        return self.format or detect_format(self.path)

    def open(self, accounting: Accounting | None = None) -> tuple[TickReader, Validator]:
        """The reader and the validator (checks + policy) of this source."""
        fmt = self.resolved_format()
        options = dict(self.options)
        allowed = set(inspect.signature(READERS[fmt]).parameters) - {"path", "symbol"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ConfigError(f"source {self.path}: format {fmt!r} takes no option {unknown}; it takes {sorted(allowed)}")
        reader = READERS[fmt](self.path, symbol=self.symbol, **options)
        order_by = (self.order_by or getattr(reader, "default_order_by", None)
                    or DEFAULT_ORDER_BY.get(fmt, "ts_ns"))
        validator = Validator(self.key, self.policy, accounting=accounting, quarantine=self.quarantine,
                              allow_equal_ts=self.allow_equal_ts, order_by=order_by,
                              symbols_allowed=self.symbols_allowed)
        return reader, validator


def open_reader(path: str | Path, format: str | None = None, **options: Any) -> TickReader:
    """A reader for ``path`` (format detected unless given); ``options`` go to the reader."""
    fmt = format or detect_format(path)
    if fmt not in READERS:
        raise ConfigError(f"format {fmt!r} is not one of {sorted(READERS)}")
    return READERS[fmt](path, **options)
