"""Vectorised conversions shared by the readers: timestamps to ns, side codes, numbers.

Each function takes a pyarrow array (or numpy array) of one column and returns a numpy array
in the tick layout plus a boolean mask of rows it could not convert, so that a bad value
refuses one row instead of failing the file. The fast path is one pyarrow/numpy call per
column; a per-element Python loop runs only on a column that already failed the fast path,
i.e. only in damaged chunks.

Timestamp units (``ts_unit``): ``s`` (int or decimal; decimals go through float64, so below
about 0.25 µs the digits are rounded), ``ms``, ``us``, ``ns``; ``iso``
(ISO-8601 text; a naive time is taken as UTC); ``auto`` (integers, unit guessed *per value*
by magnitude: < 1e11 s, < 1e14 ms, < 1e17 µs, else ns; Binance spot switched from ms to µs on
2025-01-01, so the unit is never assumed).

Range. Nanoseconds since the epoch in int64 reach 2262-04-11; a value whose conversion to ns
would pass that (a ns timestamp read as µs, a corrupt digit, an id beyond 2^63 - 1) is
*unparsable*: the row is refused, never wrapped to a plausible time. The check is on the
value before it is scaled (``|v| <= (2^63 - 1) // ns_per_unit``), so no product overflows.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import ConfigError
from ..events import SIDE_BUY, SIDE_SELL, SIDE_UNKNOWN
from .arrow_numpy import from_numpy, nulls, scalar, to_numpy

TS_UNITS = ("s", "ms", "us", "ns", "iso", "auto")
SIDE_ENCODINGS = ("auto", "buy_sell", "sign", "is_buyer_maker", "nautilus", "databento")

_UNIT_NS = {"s": 1_000_000_000, "ms": 1_000_000, "us": 1_000, "ns": 1}
INT64_MAX = np.iinfo(np.int64).max

_SIDE_WORDS: dict[str, int] = {
    "buy": SIDE_BUY, "b": SIDE_BUY, "bid": SIDE_BUY, "buyer": SIDE_BUY, "1": SIDE_BUY, "+1": SIDE_BUY,
    "sell": SIDE_SELL, "s": SIDE_SELL, "a": SIDE_SELL, "ask": SIDE_SELL, "seller": SIDE_SELL,
    "-1": SIDE_SELL,
    "unknown": SIDE_UNKNOWN, "n": SIDE_UNKNOWN, "none": SIDE_UNKNOWN, "0": SIDE_UNKNOWN,
    "no_aggressor": SIDE_UNKNOWN,
}
_BOOL_WORDS = {"true": True, "t": True, "1": True, "false": False, "f": False, "0": False}


def _as_arrow(values: pa.Array | pa.ChunkedArray | np.ndarray | list) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks()
    if isinstance(values, pa.Array):
        return values
    if isinstance(values, np.ndarray) and values.ndim == 1 and (values.dtype.kind in "iuf" or values.dtype == np.bool_):
        try:
            return from_numpy(values)  # (pa.array would import pandas: see io/arrow_numpy.py)
        except TypeError:  # a dtype with no Arrow type of ours (float16): pyarrow's way
            pass
    return pa.array(values)


def _nulls(arr: pa.Array) -> np.ndarray:
    """A writable mask of null rows."""
    return nulls(arr)


def _strict_float(v: object) -> float:
    """``float(v)``, refusing Python-only spellings a CSV never means (``1_000``)."""
    if isinstance(v, str) and "_" in v:
        raise ValueError(v)
    return float(v)  # type: ignore[arg-type]


def to_float(values: pa.Array | np.ndarray | list, scale: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Column to float64; returns ``(values, missing, unparsable)`` masks beside the values.

    ``scale`` multiplies integer fixed-point values (e.g. 1e-9 for DBN prices).
    """
    arr = _as_arrow(values)
    missing = _nulls(arr)
    bad = np.zeros(len(arr), dtype=bool)
    if pa.types.is_floating(arr.type) or pa.types.is_integer(arr.type) or pa.types.is_null(arr.type):
        # integers beyond 2^53 lose digits as float64 (a price never has that many): no error
        out = to_numpy(arr.cast(pa.float64(), safe=False))
    elif pa.types.is_dictionary(arr.type):
        return to_float(arr.dictionary_decode(), scale)
    else:
        try:
            out = to_numpy(arr.cast(pa.float64()))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            out = np.full(len(arr), np.nan)
            for i, v in enumerate(arr.to_pylist()):
                if v is None or str(v).strip() == "":
                    missing[i] = True
                    continue
                try:
                    out[i] = _strict_float(v)
                except (TypeError, ValueError):
                    bad[i] = True
    if missing.any():
        out = out.copy() if not out.flags.writeable else out
        out[missing] = np.nan
    if scale is not None:
        out = out * scale
    return out, missing, bad


def to_int(values: pa.Array | np.ndarray | list, fill: int = -1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Column to int64 (``fill`` where missing); returns ``(values, missing, unparsable)``."""
    arr = _as_arrow(values)
    missing = _nulls(arr)
    bad = np.zeros(len(arr), dtype=bool)
    if pa.types.is_dictionary(arr.type):
        return to_int(arr.dictionary_decode(), fill)
    try:
        out = to_numpy(arr.cast(pa.int64()), fill=fill)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        out = np.full(len(arr), fill, dtype=np.int64)
        for i, v in enumerate(arr.to_pylist()):
            if v is None or str(v).strip() == "":
                missing[i] = True
                continue
            try:
                if isinstance(v, str) and "_" in v:
                    raise ValueError(v)
                f = int(v) if not isinstance(v, float) else v
                if isinstance(f, float):
                    if not f.is_integer():
                        raise ValueError(v)
                    f = int(f)
                out[i] = f
            except (TypeError, ValueError, OverflowError):
                bad[i] = True
    return out, missing, bad


def _iso_one(v: str) -> int:
    t = dt.datetime.fromisoformat(v.strip().replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    delta = t - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


def _numeric_text(arr: pa.Array) -> pa.Array | None:
    """Text holding only numbers, cast to int64 (or float64); None if any value is not one."""
    blank = pc.equal(pc.utf8_trim_whitespace(arr), scalar("", pa.string()))
    arr = pc.if_else(blank, scalar(None, pa.string()), arr)
    try:
        return arr.cast(pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    if not pc.any(pc.match_substring_regex(arr, r"[.eE]")).as_py() or \
            pc.any(pc.match_substring_regex(arr, r"^\s*[-+]?[0-9]{16,}\s*$")).as_py():
        return None  # long integers among bad values: per value, so they keep every digit
    try:
        return arr.cast(pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None


def _auto_factor(mag: int) -> int:
    return 1_000_000_000 if mag < 10**11 else 1_000_000 if mag < 10**14 else 1_000 if mag < 10**17 else 1


def _auto_factors(mag: np.ndarray) -> np.ndarray:
    """:func:`_auto_factor` of each magnitude (integers or floats): s, ms, µs or ns to ns."""
    return np.where(mag < 1e11, 1_000_000_000, np.where(mag < 1e14, 1_000_000, np.where(mag < 1e17, 1_000, 1)))


def _one_ns(text: str, unit: str) -> int:
    """One timestamp given as text, in ns (raises ValueError/OverflowError when it is none)."""
    if unit == "iso":
        ns = _iso_one(text)
    elif "_" in text:
        raise ValueError(text)
    else:
        try:
            whole = int(text)  # exact: 19-digit ns survive (float64 keeps 15-16)
            ns = whole * (_auto_factor(abs(whole)) if unit == "auto" else _UNIT_NS[unit])
        except ValueError:
            try:
                value = np.array([_strict_float(text)])
                ns_arr, none = _float_ns(value, unit)
                if none[0]:
                    raise OverflowError(text)
                ns = int(ns_arr[0])
            except ValueError:
                if unit != "auto":
                    raise
                ns = _iso_one(text)
    if not -INT64_MAX <= ns <= INT64_MAX:
        raise OverflowError(text)
    return ns


def _text_ns(arr: pa.Array, unit: str, missing: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-value fallback for timestamps given as text with some bad values."""
    out = np.zeros(len(arr), dtype=np.int64)
    bad = np.zeros(len(arr), dtype=bool)
    for i, v in enumerate(arr.to_pylist()):
        text = "" if v is None else str(v).strip()
        if not text:
            missing[i] = True
            continue
        try:
            out[i] = _one_ns(text, unit)
        except (TypeError, ValueError, OverflowError):
            bad[i] = True
    return out, missing, bad


def to_ns(values: pa.Array | np.ndarray | list, unit: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Timestamps to int64 ns since the epoch (UTC); returns ``(ns, missing, unparsable)``."""
    if unit not in TS_UNITS:
        raise ConfigError(f"ts_unit {unit!r} is not one of {TS_UNITS}")
    arr = _as_arrow(values)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    missing = _nulls(arr)
    if pa.types.is_timestamp(arr.type):
        try:
            ns = to_numpy(arr.cast(pa.timestamp("ns", arr.type.tz)).cast(pa.int64()), fill=0)
            return ns, missing, np.zeros(len(arr), dtype=bool)
        except pa.ArrowInvalid:  # some value beyond 2262 once in ns: refuse those rows only
            raw = to_numpy(arr.cast(pa.int64()), fill=0)
            return _scale_checked(raw, _UNIT_NS[arr.type.unit], missing)
    if pa.types.is_date(arr.type):
        days = to_numpy(arr.cast(pa.date32()).cast(pa.int32()), fill=0)
        return _scale_checked(days.astype(np.int64), 86_400 * 1_000_000_000, missing)
    if pa.types.is_string(arr.type) and unit != "iso":
        numeric = _numeric_text(arr)
        if numeric is not None:
            return to_ns(numeric, unit)
        if unit != "auto":
            return _text_ns(arr, unit, missing)
    if unit == "iso" or (pa.types.is_string(arr.type) and unit == "auto"):
        try:
            ns = to_numpy(arr.cast(pa.timestamp("ns", "UTC")).cast(pa.int64()), fill=0)
            return ns, missing, np.zeros(len(arr), dtype=bool)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            return _text_ns(arr.cast(pa.string()), unit, missing)
    if unit == "s" or pa.types.is_floating(arr.type):
        if pa.types.is_integer(arr.type) and unit != "auto":
            raw, missing, bad = to_int(arr, 0)
            ns, _, over = _scale_checked(raw, _UNIT_NS[unit], missing)
            return ns, missing, bad | over
        f, missing, bad = to_float(arr)
        ns, over = _float_ns(f, unit)
        bad |= over & ~missing
        return ns, missing, bad
    raw, missing, bad = to_int(arr, 0)
    factor = _auto_factors(np.abs(raw)) if unit == "auto" else _UNIT_NS[unit]
    ns, _, over = _scale_checked(raw, factor, missing)
    return ns, missing, bad | over


def _float_ns(f: np.ndarray, unit: str) -> tuple[np.ndarray, np.ndarray]:
    """Float times in ``unit`` (``auto``: by magnitude, as integers are) to int64 ns, and the
    rows that are none (not finite, or past int64). The whole part is scaled as an integer
    and the fraction alone as a float, so a whole ms or µs time written as a float
    (``1723075200001.0``: pandas writes a column that held a NaN so) is exact, where
    ``round(f * 1e6)`` was up to 128 ns off (float64 steps by 256 near 1.7e18 ns)."""
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(f) & (np.abs(f) < 9.2e18)
        g = np.where(finite, f, 0.0)
        factor = _auto_factors(np.abs(g)) if unit == "auto" else np.int64(_UNIT_NS[unit])
        whole = np.floor(g)
        ns, _, over = _scale_checked(whole.astype(np.int64), factor, np.zeros(len(g), dtype=bool))
        frac = np.round((g - whole) * factor).astype(np.int64)  # (g - whole: exact, in [0, 1))
        over |= ns > INT64_MAX - frac
        ns = np.where(over, 0, ns + np.where(over, 0, frac))
    return np.where(finite, ns, 0).astype(np.int64), ~finite | over


def _scale_checked(raw: np.ndarray, factor: int | np.ndarray, missing: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``raw * factor`` as int64 ns, with rows whose product would pass int64 flagged (and 0)."""
    limit = INT64_MAX // np.asarray(factor, dtype=np.int64)
    over = (raw > limit) | (raw < -limit)
    if over.any():
        raw = np.where(over, 0, raw)
    return raw * factor, missing, over & ~missing


def _lookup(arr: pa.Array, table: Callable[[object], int | None]) -> tuple[np.ndarray, np.ndarray]:
    """Map a low-cardinality column through ``table`` via its dictionary: O(distinct) Python."""
    if not pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_encode()
    dictionary = arr.dictionary.to_pylist()
    codes = to_numpy(arr.indices, fill=-1).astype(np.int64)
    mapped = [table(v) for v in dictionary]
    lut = np.array([SIDE_UNKNOWN if m is None else m for m in mapped] + [SIDE_UNKNOWN], dtype=np.int8)
    bad_lut = np.array([m is None for m in mapped] + [False], dtype=bool)
    return lut[codes], bad_lut[codes]


def _side_word(v: object) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float) and not (isinstance(v, float) and math.isnan(v)):
        return {1: SIDE_BUY, -1: SIDE_SELL, 0: SIDE_UNKNOWN}.get(int(v)) if v == int(v) else None
    return _SIDE_WORDS.get(str(v).strip().lower())


def _buyer_maker(v: object) -> int | None:
    b = v if isinstance(v, bool) else _BOOL_WORDS.get(str(v).strip().lower())
    if b is None:
        return None
    return SIDE_SELL if b else SIDE_BUY


def _nautilus(v: object) -> int | None:
    word = str(v).strip().upper()
    return {"1": SIDE_BUY, "BUYER": SIDE_BUY, "2": SIDE_SELL, "SELLER": SIDE_SELL,
            "0": SIDE_UNKNOWN, "NO_AGGRESSOR": SIDE_UNKNOWN}.get(word)


def _databento(v: object) -> int | None:
    return {"B": SIDE_BUY, "A": SIDE_SELL, "N": SIDE_UNKNOWN}.get(str(v).strip().upper())


def to_side(values: pa.Array | np.ndarray | list, encoding: str = "auto") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Aggressor side codes to int8 (+1 buy, -1 sell, 0 unknown); ``(side, missing, unknown)``.

    Encodings: ``buy_sell`` (buy/sell/B/S/unknown, any case), ``sign`` (1/-1/0),
    ``is_buyer_maker`` (Binance: true means the *seller* was the aggressor), ``nautilus``
    (AggressorSide 1 buyer / 2 seller / 0 none), ``databento`` (B buy, A sell, N none);
    ``auto``: booleans as ``is_buyer_maker``, everything else as ``buy_sell``/``sign`` words.
    """
    if encoding not in SIDE_ENCODINGS:
        raise ConfigError(f"side_encoding {encoding!r} is not one of {SIDE_ENCODINGS}")
    arr = _as_arrow(values)
    missing = _nulls(arr)
    if encoding == "auto":
        encoding = "is_buyer_maker" if pa.types.is_boolean(arr.type) else "buy_sell"
    if pa.types.is_boolean(arr.type) and encoding == "is_buyer_maker":
        b = to_numpy(arr, fill=False)
        side = np.where(b, SIDE_SELL, SIDE_BUY).astype(np.int8)
        side[missing] = SIDE_UNKNOWN
        return side, missing, np.zeros(len(arr), dtype=bool)
    if pa.types.is_integer(arr.type) and encoding in ("sign", "buy_sell"):
        raw = to_numpy(arr, fill=0)
        unknown = ~np.isin(raw, (-1, 0, 1))
        return np.where(unknown, 0, raw).astype(np.int8), missing, unknown & ~missing
    table = {"buy_sell": _side_word, "sign": _side_word, "is_buyer_maker": _buyer_maker,
             "nautilus": _nautilus, "databento": _databento}[encoding]
    side, unknown = _lookup(arr, table)
    return side, missing, unknown & ~missing


def symbol_codes(values: pa.Array | np.ndarray | list) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Symbol column to (uint32 codes, names, missing) without one Python string per row."""
    arr = _as_arrow(values)
    missing = _nulls(arr)
    if not pa.types.is_dictionary(arr.type):
        arr = pc.cast(arr, pa.string()) if not pa.types.is_string(arr.type) else arr
        arr = arr.dictionary_encode()
    names = [str(v) for v in arr.dictionary.to_pylist()]
    codes = to_numpy(arr.indices, fill=0).astype(np.uint32)
    if missing.any() or not names:  # rows without a symbol get a code of their own: ""
        if "" not in names:
            names.append("")
        codes[missing] = names.index("")
    return codes, names, missing


def civil_to_ns(year: np.ndarray, month: np.ndarray, day: np.ndarray, seconds: np.ndarray, frac_ns: np.ndarray) -> np.ndarray:
    """Calendar fields (arrays) to ns since the epoch, proleptic Gregorian, no time zone."""
    y = year.astype(np.int64) - (month <= 2)
    era = np.floor_divide(y, 400)
    yoe = y - era * 400
    m = month.astype(np.int64)
    doy = (153 * (m + np.where(m > 2, -3, 9)) + 2) // 5 + day.astype(np.int64) - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    days = era * 146_097 + doe - 719_468
    return (days * 86_400 + seconds.astype(np.int64)) * 1_000_000_000 + frac_ns.astype(np.int64)


_MONTH_DAYS = np.array([31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])


def fixed_layout_ns(values: pa.Array, fields: dict[str, tuple[int, int]], offset_ns: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parse fixed-position timestamps (e.g. HistData ``YYYYMMDD HHMMSSmmm``) vectorised.

    ``fields`` maps ``Y m d H M S f`` to ``(start, length)`` character positions; ``f`` is the
    fraction of a second (any number of digits). ``offset_ns`` is added (e.g. +5 h for EST).
    A date or time that does not exist (Feb 30, 25:00, minute 61) is unparsable, never carried
    into the next day or month. Returns ``(ns, missing, unparsable)``.
    """
    arr = _as_arrow(values)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    missing = _nulls(arr)
    arr = pc.utf8_trim_whitespace(arr.fill_null(scalar("", pa.string())))
    need = max(s + n for s, n in fields.values())
    template = ["."] * need
    for start, n in fields.values():
        template[start : start + n] = ["[0-9]"] * n
    ok = to_numpy(pc.match_substring_regex(arr, "^" + "".join(template) + "[0-9]*$"), fill=False)
    bad = ~ok
    safe = arr if ok.all() else pc.if_else(from_numpy(ok), arr, scalar("0" * need, pa.string()))
    parts: dict[str, np.ndarray] = {}
    for key, (start, n) in fields.items():
        parts[key] = to_numpy(pc.utf8_slice_codeunits(safe, start, start + n).cast(pa.int64()))
    bad &= ~missing
    frac = parts.get("f", np.zeros(len(arr), dtype=np.int64))
    if "f" in fields:
        frac = frac * 10 ** (9 - fields["f"][1])
    month, day = parts["m"], parts["d"]
    year = parts["Y"]
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    last_day = _MONTH_DAYS[np.clip(month, 1, 12) - 1] + ((month == 2) & leap)
    bad |= (month < 1) | (month > 12) | (day < 1) | (day > last_day)
    for key, top in (("H", 24), ("M", 60), ("S", 60)):  # 25:61 would be the next day, silently
        if key in parts:
            bad |= parts[key] >= top
    secs = parts.get("H", 0) * 3600 + parts.get("M", 0) * 60 + parts.get("S", 0)
    ns = civil_to_ns(parts["Y"], np.clip(month, 1, 12), np.clip(day, 1, 31), secs, frac) + offset_ns
    ns[bad | missing] = 0
    return ns, missing, bad
