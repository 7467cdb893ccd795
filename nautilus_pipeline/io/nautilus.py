"""NautilusTrader's fixed-point Parquet columns, decoded exactly; catalog folders found.

Since NautilusTrader 1.200 a catalog stores prices and sizes as ``fixed_size_binary[8]``
(64-bit builds, raw int64, 9 decimal places: ``FIXED_PRECISION = 9``) or
``fixed_size_binary[16]`` (high-precision builds, raw int128, 16 decimal places), little
endian two's complement, with ``price_precision``/``size_precision`` (the instrument's
decimals) in the schema metadata. The value is ``raw / 10**scale``.

Exact. The raw integer is divided by ``10**(scale - precision)`` as an integer first (it is a
multiple of it for every value the instrument can hold), which leaves the instrument's own
decimal digits ``q``; ``q / 10**precision`` in float64 is then the float nearest to the
decimal value (IEEE division is correctly rounded and ``q`` is exact below 2**53), so
``1.12120`` reads as ``1.1212``, not ``1.1212000000000002``. A raw value that is not such a
multiple (no precision in the metadata, or an odd file) goes through Python's exact
``int / int`` instead. The 128-bit column is reinterpreted as Arrow ``decimal128`` (the same
16-byte layout) so that pyarrow does the 128-bit rescale, checking that no digit is lost.
Signedness. Prices are ``i64``/``i128`` (two's complement), quantities ``u64``/``u128``
(``QuantityRaw`` is unsigned): a 64-bit size above ``i64::MAX`` raw (9.2e9 units; 64-bit
``QUANTITY_MAX`` is 18,446,744,073) is a valid quantity, so size columns are decoded unsigned
(``unsigned=True``), never as a negative number.

Sentinels. ``PRICE_UNDEF`` (the signed type's max) and ``QUANTITY_UNDEF`` (the unsigned type's
max, ``u64::MAX`` or ``u128::MAX``: all bits set) mean "no value": both become NaN. A NaN trade
price or size is then refused by the checks (``price_not_finite``/``size_not_positive``, with
the field and the file's row), a NaN quote size reads as "size unknown" (as a DBN
``UNDEF_ORDER_SIZE`` does); nothing reaches a stage as a number it is not.

Catalog folders. ``ParquetDataCatalog`` writes ``data/<data type>/<instrument id>/*.parquet``;
:func:`catalog_files` lists, for a folder given as ``--ticks``, the trade and quote files in
it (sorted, so a day's files replay in order). Order-book deltas (``OrderBookDelta``: action,
side, price, size, order_id, flags) are not read yet: their L2/L3 meaning depends on the
venue's book type, which the file does not say, so a deltas file is refused with that reason
(never read as trades, which its ``price``/``size`` columns would otherwise map to).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import DataError

SCALE_OF_WIDTH = {8: 9, 16: 16}
"""Decimal places of NautilusTrader's raw fixed-point values, by byte width."""
CATALOG_TYPES = ("trade_tick", "quote_tick")
DELTA_TYPES = ("order_book_delta", "order_book_deltas", "order_book_depth10")
DELTA_COLUMNS = frozenset({"action", "side", "price", "size", "order_id", "flags"})
_I64_MAX = np.iinfo(np.int64).max
_U64_MAX = np.iinfo(np.uint64).max
SIZE_FIELDS = frozenset({"size", "bid_size", "ask_size"})
"""Tick fields that hold NautilusTrader quantities (unsigned raw values)."""


def is_fixed_point(t: pa.DataType) -> bool:
    return pa.types.is_fixed_size_binary(t) and t.byte_width in SCALE_OF_WIDTH


def precision_of(metadata: dict[bytes, bytes] | None, column: str) -> int | None:
    """The instrument's decimals for ``column`` from the schema metadata (None if absent)."""
    if not metadata:
        return None
    key = b"size_precision" if "size" in column else b"price_precision"
    value = metadata.get(key)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _exact(raw: list[int], scale: int) -> np.ndarray:
    return np.array([r / 10**scale for r in raw], dtype=np.float64)


def fixed_point_to_float(arr: pa.Array | pa.ChunkedArray, precision: int | None, *,
                         unsigned: bool = False) -> pa.Array:
    """A ``fixed_size_binary[8|16]`` NautilusTrader column as float64 (see the module doc);
    ``unsigned`` for quantity columns (``u64``/``u128`` raw values, ``QUANTITY_UNDEF`` -> NaN)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    width = arr.type.byte_width
    scale = SCALE_OF_WIDTH[width]
    p = scale if precision is None or not 0 <= precision <= scale else precision
    n = len(arr)
    valid = arr.buffers()[0]
    data = arr.buffers()[1]
    if width == 8:
        raw = np.frombuffer(data, dtype="<u8" if unsigned else "<i8", count=n, offset=arr.offset * 8)
        undef = raw == (_U64_MAX if unsigned else _I64_MAX)
        step = raw.dtype.type(10 ** (scale - p))
        q, rem = np.divmod(raw, step)
        ok = (rem == 0) & (q < 1 << 53) if unsigned else (rem == 0) & (np.abs(q) < 1 << 53)
        out = q / float(10**p)
        if not ok.all():
            bad = np.flatnonzero(~ok & ~undef)
            out[bad] = _exact(raw[bad].tolist(), scale)
    else:
        dec = pa.Array.from_buffers(pa.decimal128(38, scale), n, [valid, data], offset=arr.offset)
        words = np.frombuffer(data, dtype="<i8", count=2 * n, offset=arr.offset * 16).reshape(n, 2)
        if unsigned:  # u128::MAX; a set top bit is a u128 above i128::MAX (the exact path below)
            undef = (words[:, 1] == -1) & (words[:, 0] == -1)
            high = words[:, 1] < 0
        else:  # i128::MAX
            undef = (words[:, 1] == _I64_MAX) & (words[:, 0] == -1)
            high = np.zeros(n, dtype=bool)
        try:
            scaled = pc.cast(dec, pa.decimal128(38, p))  # exact rescale, or ArrowInvalid
            sw = np.frombuffer(scaled.buffers()[1], dtype="<i8", count=2 * n, offset=scaled.offset * 16).reshape(n, 2)
            q = sw[:, 0]
            fits = ((sw[:, 1] == 0) & (q >= 0)) | ((sw[:, 1] == -1) & (q < 0))
            ok = fits & (np.abs(q) < 1 << 53) & ~high
            out = q / float(10**p)
        except pa.ArrowInvalid:
            ok = np.zeros(n, dtype=bool)
            out = np.empty(n)
        if not ok.all():
            bad = np.flatnonzero(~ok & ~undef)
            ints = [int.from_bytes(arr[i].as_py(), "little", signed=not unsigned) for i in bad.tolist()]
            out[bad] = _exact(ints, scale)
    out[undef] = np.nan
    mask = None if valid is None else ~np.asarray(arr.is_valid())
    return pa.array(out, type=pa.float64(), mask=mask)


def catalog_files(folder: str | Path) -> list[Path]:
    """The tick files of a ``ParquetDataCatalog`` folder (the catalog root, its ``data``
    folder, or one data type's folder), sorted; DataError when it holds none."""
    root = Path(folder).resolve()
    bases = [root / "data", root]
    found: list[Path] = []
    for base in bases:
        for kind in CATALOG_TYPES:
            d = base / kind
            if d.is_dir():
                found += sorted(d.rglob("*.parquet"))
        if found:
            return found
    if root.name in CATALOG_TYPES or root.parent.name in CATALOG_TYPES:
        found = sorted(root.rglob("*.parquet"))
    if not found and (root.name in DELTA_TYPES or any((b / k).is_dir() for b in bases for k in DELTA_TYPES)):
        raise DataError(f"{root}: the catalog holds order-book deltas only; NautilusTrader OrderBookDelta "
                        "files are not read yet (see io/nautilus.py): give trade_tick/quote_tick data")
    if not found:
        raise DataError(f"{root} is a folder, but no NautilusTrader catalog tick files in it "
                        f"(looked for {', '.join(CATALOG_TYPES)} under data/); give the files instead")
    return found
