"""A numba byte parser for Binance public trades CSV lines, the fast path of
:func:`~nautilus_pipeline.io.binance.binance_trades` on large blocks.

Why. pyarrow's threaded CSV parse and the conversions after it were most of a replay's end to
end time (issue 9: 1M trades through an EMA stage). The layout is fixed
(``id,price,qty,quote_qty,time,is_buyer_maker[,is_best_match]``), so one pass over the bytes
splits the fields and writes the replay's tick columns (``ts_ns``, ``price``, ``size``,
``side``, ``trade_id``) at once, with no Arrow table and no per-column conversion after it.
Fields are read eight bytes at a time (SWAR: the first non-digit of a word from bit masks,
eight digits to an integer in three multiplies), so few branches depend on the data. The
block is cut in two at a line end and both halves are parsed side by side (``nogil``).

Exactness. A block is parsed here only if every line is in the plain form Binance writes:
the expected number of fields, no quotes, an id and a time of 1-18 digits (no sign), price
and qty ``-?d+(.d+)?`` of at most 18 digits whose integer ``m`` (the digits without the point)
is at most 2**53, ``true``/``false`` (or ``True``/``False``), the unused fields of bytes
``+`` to ``z`` but the comma, and a time whose nanoseconds fit int64. Such a decimal is
``m / 10**f`` with ``m`` and ``10**f`` (``f <= 22``) exact floats: one IEEE division, so
correctly rounded, the float64 pyarrow's parse gives. The time's unit is decided by its
magnitude as ``convert.to_ns`` does for ``ts_unit="auto"``, and ``is_buyer_maker = true``
is the sell side, as ``convert.to_side`` has it. On the first other line (an empty id,
price, qty, time or side, ``nan``, an exponent, a carriage return, a wrong field count, ...)
the block goes to pyarrow; the unused fields may be empty, as pyarrow, which does not read
them, takes them. A block with a line over ``csv.MAX_LINE`` never comes here (the exact path
refuses that line). So every refusal, its reason and its line number are the pyarrow path's.
``tests/test_io_binance_fast.py`` checks the columns against the pyarrow path on generated,
bundled and fuzzed lines, and runs the damaged-file cases through both.
"""

from __future__ import annotations

import threading

import numpy as np
from numba import njit
from numba.cpython.unsafe.numbers import trailing_zeros

from ..events import SIDE_BUY, SIDE_SELL
from .tardis_l2_fast import _POW10, _eight_digits, _load8

_EXACT = 1 << 53
_INT64_MAX = 9223372036854775807
_HI = np.uint64(0xF0F0F0F0F0F0F0F0)
_ZEROS = np.uint64(0x3030303030303030)
_SIX = np.uint64(0x0606060606060606)
_LOW7 = np.uint64(0x7F7F7F7F7F7F7F7F)
_HIGH = np.uint64(0x8080808080808080)
_POW10_INT = np.array([10**i for i in range(19)], dtype=np.int64)


@njit(cache=True, inline="always")
def _digits_in(x):
    """How many of the 8 bytes of ``x`` (first byte lowest) are ASCII digits before the first
    other byte (0-8). A byte after one >= 0xFA may read as a non-digit: only ever shorter."""
    t = ((x & _HI) ^ _ZEROS) | (((x + _SIX) & _HI) ^ _ZEROS)
    nz = (((t & _LOW7) + _LOW7) | t) & _HIGH
    if nz == 0:
        return 8
    return np.int64(trailing_zeros(nz) >> np.uint64(3))


@njit(cache=True, inline="always")
def _value_of(x, k):
    """The integer of the first ``k`` (1-8) digit bytes of ``x``."""
    if k < 8:
        s = np.uint64(8 * (8 - k))
        x = (x << s) | (_ZEROS >> np.uint64(8 * k))
    v, _ = _eight_digits(x)
    return np.int64(v)


@njit(cache=True, inline="always")
def _integer(buf, i, b):
    """An unsigned integer of 1-18 digits ending at a comma: (value, comma, ok)."""
    if i + 16 <= b:
        x = _load8(buf, i)
        k = _digits_in(x)
        if 0 < k < 8:
            return _value_of(x, k), i + k, buf[i + k] == 44
        if k == 8:
            y = _load8(buf, i + 8)
            k2 = _digits_in(y)
            if k2 < 8:
                v = _value_of(x, 8)
                if k2:
                    v = v * _POW10_INT[k2] + _value_of(y, k2)
                return v, i + 8 + k2, buf[i + 8 + k2] == 44
    start = i
    v = np.int64(0)
    while i < b:
        c = np.int64(buf[i]) - 48
        if c < 0 or c > 9:
            break
        v = v * 10 + c
        i += 1
        if i - start > 18:
            return np.int64(0), i, False
    return v, i, i > start and i < b and buf[i] == 44


@njit(cache=True, inline="always")
def _decimal_slow(buf, i, b, pow10):
    """``-?d+(.d+)?`` ending at a comma, byte by byte: (value, comma, ok)."""
    neg = i < b and buf[i] == 45
    if neg:
        i += 1
    m = np.int64(0)
    start = i
    while i < b:
        c = np.int64(buf[i]) - 48
        if c < 0 or c > 9:
            break
        m = m * 10 + c
        i += 1
        if i - start > 18:
            return 0.0, i, False
    digits = i - start
    frac = 0
    if i < b and buf[i] == 46:
        i += 1
        fs = i
        while i < b:
            c = np.int64(buf[i]) - 48
            if c < 0 or c > 9:
                break
            m = m * 10 + c
            i += 1
            if i - start > 19:
                return 0.0, i, False
        frac = i - fs
        if frac == 0:
            return 0.0, i, False
    if digits == 0 or m > _EXACT or (neg and m == 0) or i >= b or buf[i] != 44:
        return 0.0, i, False
    v = np.float64(m) / pow10[frac]
    return (-v if neg else v), i, True


@njit(cache=True, inline="always")
def _decimal(buf, i, b, pow10):
    """``d{1,7}(.d{1,7})?`` a word at a time, else :func:`_decimal_slow`: (value, comma, ok)."""
    if i + 16 <= b:
        x = _load8(buf, i)
        k = _digits_in(x)
        if 0 < k < 8:
            ip = _value_of(x, k)
            j = i + k
            c = buf[j]
            if c == 44:
                return np.float64(ip), j, True
            if c == 46:
                y = _load8(buf, j + 1)
                f = _digits_in(y)
                if 0 < f < 8 and buf[j + 1 + f] == 44:
                    m = ip * _POW10_INT[f] + _value_of(y, f)
                    return np.float64(m) / pow10[f], j + 1 + f, True
    return _decimal_slow(buf, i, b, pow10)


@njit(cache=True, inline="always")
def _skip(buf, i, b):
    """Past a field the replay does not use (bytes ``+`` to ``z`` but the comma): (end, ok)."""
    while i < b:
        c = buf[i]
        if c == 44 or c == 10:
            return i, True
        if c < 43 or c > 122:
            return i, False
        i += 1
    return i, True


@njit(cache=True, inline="always")
def _maker(buf, i, b):
    """``true``/``True`` (1) or ``false``/``False`` (0) at ``i``: (value, end, ok)."""
    if i + 4 <= b and (buf[i] == 116 or buf[i] == 84) and buf[i + 1] == 114 and buf[i + 2] == 117 \
            and buf[i + 3] == 101:
        return 1, i + 4, True
    if i + 5 <= b and (buf[i] == 102 or buf[i] == 70) and buf[i + 1] == 97 and buf[i + 2] == 108 \
            and buf[i + 3] == 115 and buf[i + 4] == 101:
        return 0, i + 5, True
    return 0, i, False


@njit(cache=True, nogil=True)
def parse_trades(buf, fields, pow10, ts, price, size, side, trade_id):
    """Parse the whole lines of ``buf`` (the last may lack its newline) into tick columns.

    Returns the rows parsed, all of them, or ``-1 - r`` where row ``r`` is the first line
    not in the plain form (the caller then parses the block with pyarrow).
    """
    b = buf.shape[0]
    i = 0
    r = 0
    while i < b:
        if r >= ts.shape[0]:
            return -1 - r
        v, i, ok = _integer(buf, i, b)
        if not ok:
            return -1 - r
        trade_id[r] = v
        p, i, ok = _decimal(buf, i + 1, b, pow10)
        if not ok:
            return -1 - r
        price[r] = p
        q, i, ok = _decimal(buf, i + 1, b, pow10)
        if not ok:
            return -1 - r
        size[r] = q
        i, ok = _skip(buf, i + 1, b)
        if not ok or i >= b or buf[i] != 44:
            return -1 - r
        t, i, ok = _integer(buf, i + 1, b)
        if not ok:
            return -1 - r
        # the unit by magnitude, as convert.to_ns for ts_unit="auto" (t >= 0 here)
        factor = 1_000_000_000 if t < 100_000_000_000 else 1_000_000 if t < 100_000_000_000_000 \
            else 1_000 if t < 100_000_000_000_000_000 else 1
        if t > _INT64_MAX // factor:  # as convert.to_ns: the ns must fit int64
            return -1 - r
        ts[r] = t * factor
        m, i, ok = _maker(buf, i + 1, b)
        if not ok:
            return -1 - r
        side[r] = SIDE_SELL if m else SIDE_BUY
        if fields == 7:
            if i >= b or buf[i] != 44:
                return -1 - r
            i, ok = _skip(buf, i + 1, b)
            if not ok:
                return -1 - r
        if i < b:
            if buf[i] != 10:
                return -1 - r
            i += 1
        r += 1
    return r


def _middle_line_start(buf: np.ndarray) -> int:
    """Just after the first newline at or past the middle of ``buf`` (its length if none)."""
    mid = len(buf) // 2
    for end in (mid + 4096, len(buf)):  # a line is short: look a page ahead first
        nl = np.flatnonzero(buf[mid:end] == 10)
        if len(nl):
            return mid + int(nl[0]) + 1
    return len(buf)


_loaded = False
"""Whether ``parse_trades`` has run in this process (compiled, or loaded from numba's cache)."""


def parse_block(data: object, lines: int, fields: int) -> dict[str, np.ndarray] | None:
    """The columns ``ts_ns, price, size, side, trade_id`` of a block of ``lines`` whole lines,
    or None if a line is not plain. Two halves in two threads (the second on this one); both
    are joined before returning.

    The first block of a process on its main thread is parsed on a helper thread while the
    main one waits: that call compiles the parser or loads it from numba's cache (seconds on
    a fresh checkout), and a Ctrl-C or SIGTERM landing in numba's compile, a C callback, is
    swallowed there and printed as an ignored exception with its traceback (a ``bucket_volume
    = "auto"`` pre-read on the command line's main thread did). A wait is interrupted cleanly."""
    global _loaded
    if _loaded or threading.current_thread() is not threading.main_thread():
        return _parse_block(data, lines, fields)
    box: list[object] = []
    done = threading.Event()

    def load() -> None:
        try:
            box.append(_parse_block(data, lines, fields))
        except BaseException as exc:  # handed to the waiting thread
            box.append(exc)
        finally:
            done.set()

    # a daemon: an interrupted process does not wait for a compile nobody needs any more
    threading.Thread(target=load, name="binance-parse-load", daemon=True).start()
    done.wait()
    if isinstance(box[0], BaseException):
        raise box[0]
    _loaded = True
    return box[0]  # type: ignore[return-value]


def _parse_block(data: object, lines: int, fields: int) -> dict[str, np.ndarray] | None:
    buf = np.frombuffer(data, dtype=np.uint8)
    cols = {"ts_ns": np.empty(lines, np.int64), "price": np.empty(lines, np.float64),
            "size": np.empty(lines, np.float64), "side": np.empty(lines, np.int8),
            "trade_id": np.empty(lines, np.int64)}
    cut = _middle_line_start(buf)
    head = int(np.count_nonzero(buf[:cut] == 10)) + (1 if cut and buf[cut - 1] != 10 else 0)
    if head > lines:
        return None
    firsts = [c[:head] for c in cols.values()]
    rests = [c[head:] for c in cols.values()]
    got = [-1]

    def first() -> None:
        got[0] = parse_trades(buf[:cut], fields, _POW10, *firsts)

    worker = threading.Thread(target=first, name="binance-parse")
    worker.start()
    try:
        rest = parse_trades(buf[cut:], fields, _POW10, *rests)
    finally:
        worker.join()
    if got[0] != head or rest != lines - head:
        return None
    return cols
