"""A numba byte parser for Tardis ``incremental_book_L2`` lines, the fast path of
:class:`~nautilus_pipeline.io.tardis_book.TardisIncrementalBookReader`.

Why. pyarrow's CSV parse of the eight columns as text alone is below the 5M lines/s the issue
asks for (2.4-6.8M lines/s on the dev VM, before any conversion). The layout is fixed
(``exchange,symbol,timestamp,local_timestamp,is_snapshot,side,price,amount``), so one pass over
the bytes can split the fields and convert them at once.

Exactness. Only lines in the plain form Tardis writes are converted here: eight fields, no
quotes, exchange and symbol of ``[A-Za-z0-9._:/-]``, integer timestamps of at most 19 digits,
``true``/``false``, ``bid``/``ask``, decimals ``-?d+(.d+)?`` of at most 15 significant digits.
Such a decimal is ``m / 10**f`` with ``m < 2**53`` and ``f <= 22``: one IEEE division of two
exact floats, so correctly rounded, the float64 pyarrow's cast gives. Every other line (a wrong
field count, an empty field, ``NaN``, exponents, spaces, a symbol pyarrow would read as null,
...) is flagged *odd* and converted by the reader's pyarrow path, line by line as a small
table, so its verdict (refused with its reason and line) is the pyarrow path's. Blank lines
are skipped; every other line has its physical line number.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

HEADER = b"exchange,symbol,timestamp,local_timestamp,is_snapshot,side,price,amount"
SYMBOLS_MAX = 4096
"""Distinct symbols per block parsed here (lines of further symbols go the pyarrow way)."""
_POW10 = np.array([10.0**i for i in range(23)])
_INT64_MAX = 9223372036854775807


@intrinsic
def _load8(typingctx, arr, idx):
    """The 8 bytes at ``arr[idx:idx + 8]`` as one little-endian uint64 (an unaligned load; the
    caller keeps ``idx + 8`` within the array)."""
    sig = types.uint64(arr, idx)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.gep(ary.data, [args[1]])
        return builder.load(builder.bitcast(ptr, ir.IntType(64).as_pointer()), align=1)

    return sig, codegen


@njit(cache=True, inline="always")
def _same_bytes(buf, a, b, n):
    """``buf[a:a + n] == buf[b:b + n]``, 8 bytes at a time (n >= 8; both ranges inside buf)."""
    t = 0
    while t + 8 <= n:
        if _load8(buf, a + t) != _load8(buf, b + t):
            return False
        t += 8
    return t == n or _load8(buf, a + n - 8) == _load8(buf, b + n - 8)


@njit(cache=True, inline="always")
def _word_char(c):
    return (48 <= c <= 57) or (65 <= c <= 90) or (97 <= c <= 122) or c == 46 or c == 95 or c == 45 or c == 58 \
        or c == 47


@njit(cache=True, inline="always")
def _is(buf, a, b, w0, w1, w2, w3, w4, n):
    """``buf[a:b]`` equals the ``n``-letter word ``w0..w4``."""
    if b - a != n:
        return False
    ws = (w0, w1, w2, w3, w4)
    for i in range(n):
        if buf[a + i] != ws[i]:
            return False
    return True


@njit(cache=True, inline="always")
def _decimal(buf, i, b, stop, stop2, pow10):
    """``-?d+(.d+)?`` (at most 15 significant digits) from ``i`` up to byte ``stop`` or
    ``stop2``, or ``b``: (value, position of the stop byte, ok)."""
    neg = False
    if i < b and buf[i] == 45:
        neg = True
        i += 1
    m = np.int64(0)
    digits = 0
    sig = 0
    frac = 0
    dot = False
    while i < b:
        c = buf[i]
        if 48 <= c <= 57:
            if dot:
                frac += 1
            digits += 1
            if sig > 0 or c != 48:
                sig += 1
            m = m * 10 + (c - 48)
        elif c == 46 and not dot and digits > 0:
            dot = True
        elif c == stop or c == stop2:
            break
        else:
            return 0.0, i, False
        i += 1
    if digits == 0 or sig > 15 or frac > 22 or (dot and frac == 0) or (neg and m == 0):
        return 0.0, i, False
    v = np.float64(m) / pow10[frac]
    return (-v if neg else v), i, True


@njit(cache=True, inline="always")
def _eight_digits(x):
    """(value, ok) of 8 ASCII digits loaded as a little-endian uint64 (the first digit lowest)."""
    hi = np.uint64(0xF0F0F0F0F0F0F0F0)
    zeros = np.uint64(0x3030303030303030)
    if (x & hi) != zeros or ((x + np.uint64(0x0606060606060606)) & hi) != zeros:
        return np.uint64(0), False
    x = ((x & np.uint64(0x0F0F0F0F0F0F0F0F)) * np.uint64(2561)) >> np.uint64(8)
    x = ((x & np.uint64(0x00FF00FF00FF00FF)) * np.uint64(6553601)) >> np.uint64(16)
    x = ((x & np.uint64(0x0000FFFF0000FFFF)) * np.uint64(42949672960001)) >> np.uint64(32)
    return x, True


@njit(cache=True, inline="always")
def _integer(buf, i, b, limit):
    """An integer of 1-19 digits up to the next comma, at most ``limit``: (value, comma, ok).
    Sixteen digits and a comma (Tardis's µs timestamps) are read 8 bytes at a time."""
    if i + 17 <= b and buf[i + 16] == 44:
        x1, ok1 = _eight_digits(_load8(buf, i))
        x2, ok2 = _eight_digits(_load8(buf, i + 8))
        if ok1 and ok2:
            v = np.int64(x1 * np.uint64(100_000_000) + x2)
            return v, i + 16, v <= limit
    v = np.uint64(0)
    start = i
    while i < b:
        c = buf[i]
        if 48 <= c <= 57:
            v = v * np.uint64(10) + np.uint64(c - 48)
        elif c == 44:
            break
        else:
            return np.int64(0), i, False
        i += 1
        if i - start > 19:  # 19 digits fit a uint64 (< 1e19 < 2**64)
            return np.int64(0), i, False
    if i == start or i >= b or v > np.uint64(limit):
        return np.int64(0), i, False
    return np.int64(v), i, True


@njit(cache=True, inline="always")
def _plain_word(buf, s, e):
    """A word pyarrow reads as itself: ``[A-Za-z0-9._:/-]+`` and none of its null spellings."""
    if e <= s:
        return False
    for i in range(s, e):
        if not _word_char(buf[i]):
            return False
    return not (_is(buf, s, e, 110, 97, 110, 0, 0, 3) or _is(buf, s, e, 78, 97, 78, 0, 0, 3)  # nan NaN
                or _is(buf, s, e, 110, 117, 108, 108, 0, 4) or _is(buf, s, e, 78, 85, 76, 76, 0, 4)  # null NULL
                or _is(buf, s, e, 78, 65, 0, 0, 0, 2) or _is(buf, s, e, 78, 47, 65, 0, 0, 3)  # NA N/A
                or _is(buf, s, e, 110, 47, 97, 0, 0, 3) or _is(buf, s, e, 45, 110, 97, 110, 0, 4)  # n/a -nan
                or _is(buf, s, e, 45, 78, 97, 78, 0, 4))  # -NaN


@njit(cache=True)
def parse_lines(buf, end, first_line, ts_factor, recv_factor, pow10, out, outf, sym_off, sym_len, sym_hash, sym_slot):
    """Parse the lines of ``buf[:end]`` (``end`` just after a newline, or the file's end).

    Per data line ``k``, one row of ``out`` (one write stream: eleven column arrays made the
    loop twice as slow): timestamp, receive time, price and amount (float64 bits, ``outf``
    views the same memory), the line's byte range, its number, and ``meta`` (symbol code,
    side + 1 << 32, snapshot << 34, odd << 35: not converted, the caller's pyarrow path does it). Symbols get codes in order of appearance
    (``sym_off``/``sym_len``: their bytes). One pass a line; a line that starts with the same
    exchange and symbol bytes as the previous plain line takes its code without a lookup.
    Returns (lines, symbols, next line number)."""
    k = 0
    n_sym = 0
    line = first_line
    pos = 0
    mask = sym_slot.shape[0] - 1
    ts_limit = _INT64_MAX // ts_factor
    recv_limit = _INT64_MAX // recv_factor
    prev_a = -1  # the previous plain line: start, length of "exchange,symbol," and its code
    prev_n = 0
    prev_code = 0
    while pos < end:
        a = pos
        if buf[a] == 10 or (buf[a] == 13 and a + 1 < end and buf[a + 1] == 10):  # a blank line
            pos = a + (1 if buf[a] == 10 else 2)
            line += 1
            continue
        out[k, 6] = line
        line += 1
        out[k, 4] = a
        out[k, 7] = np.int64(1) << 35
        k += 1
        i = a
        b = -1  # the line's end once known
        plain = False
        t_ns, r_ns, p, q, sd, sn = np.int64(0), np.int64(0), 0.0, 0.0, 0, False
        while True:  # one pass over a plain line; any surprise leaves it odd (break)
            # exchange and symbol: the previous plain line's bytes, or checked and looked up
            code = -1
            if prev_a >= 0 and a + prev_n < end:
                if prev_n >= 8:
                    same = _same_bytes(buf, a, prev_a, prev_n)
                else:
                    same = True
                    for t in range(prev_n):
                        if buf[a + t] != buf[prev_a + t]:
                            same = False
                            break
                if same:
                    code = prev_code
                    i = a + prev_n
            if code < 0:
                c1 = a
                while c1 < end and buf[c1] != 44 and buf[c1] != 10:
                    c1 += 1
                c2 = c1 + 1
                while c2 < end and buf[c2] != 44 and buf[c2] != 10:
                    c2 += 1
                if c2 >= end or buf[c2] != 44 or not _plain_word(buf, a, c1) or not _plain_word(buf, c1 + 1, c2):
                    i = c1
                    break
                s1, e1 = c1 + 1, c2
                h = np.uint64(14695981039346656037)
                for t in range(s1, e1):
                    h = (h ^ np.uint64(buf[t])) * np.uint64(1099511628211)
                j = np.int64(h & np.uint64(mask))
                while sym_slot[j] >= 0:
                    c = sym_slot[j]
                    if sym_hash[c] == np.int64(h) and sym_len[c] == e1 - s1:
                        same = True
                        o = sym_off[c]
                        for t in range(e1 - s1):
                            if buf[o + t] != buf[s1 + t]:
                                same = False
                                break
                        if same:
                            code = c
                            break
                    j = (j + 1) & mask
                if code < 0:
                    if n_sym >= SYMBOLS_MAX:
                        break
                    code = n_sym
                    sym_slot[j] = code
                    sym_off[code] = s1
                    sym_len[code] = e1 - s1
                    sym_hash[code] = np.int64(h)
                    n_sym += 1
                i = c2 + 1
                prev_a, prev_n, prev_code = a, i - a, code
            t_ns, i, ok = _integer(buf, i, end, ts_limit)
            if not ok:
                break
            r_ns, i, ok = _integer(buf, i + 1, end, recv_limit)
            if not ok:
                break
            i += 1
            if i + 5 <= end and buf[i] == 116 and buf[i + 1] == 114 and buf[i + 2] == 117 and buf[i + 3] == 101 \
                    and buf[i + 4] == 44:
                sn = True
                i += 5
            elif i + 6 <= end and buf[i] == 102 and buf[i + 1] == 97 and buf[i + 2] == 108 and buf[i + 3] == 115 \
                    and buf[i + 4] == 101 and buf[i + 5] == 44:
                sn = False
                i += 6
            else:
                break
            if i + 4 <= end and buf[i] == 98 and buf[i + 1] == 105 and buf[i + 2] == 100 and buf[i + 3] == 44:
                sd = 1
            elif i + 4 <= end and buf[i] == 97 and buf[i + 1] == 115 and buf[i + 2] == 107 and buf[i + 3] == 44:
                sd = -1
            else:
                break
            p, i, ok = _decimal(buf, i + 4, end, 44, 44, pow10)
            if not ok or i >= end:
                break
            q, i, ok = _decimal(buf, i + 1, end, 10, 13, pow10)  # to the line's end (a comma: odd)
            if not ok:
                break
            if i == end:
                b, pos = i, i
            elif buf[i] == 10:
                b, pos = i, i + 1
            elif i + 1 < end and buf[i + 1] == 10:  # \r\n
                b, pos = i, i + 2
            else:  # a lone \r (pyarrow ends a row there)
                break
            plain = True
            break
        r = k - 1
        if not plain:  # find the line's end from where the parse stopped
            while i < end and buf[i] != 10:
                i += 1
            b, pos = i, i + 1
            if b > a and buf[b - 1] == 13:
                b -= 1
            out[r, 5] = b
            continue
        out[r, 5] = b
        out[r, 0] = t_ns * ts_factor
        out[r, 1] = r_ns * recv_factor
        outf[r, 2] = p
        outf[r, 3] = q
        out[r, 7] = code | (np.int64(sd + 1) << 32) | (np.int64(1 if sn else 0) << 34)
    return k, n_sym, line


@njit(cache=True)
def newlines(buf):
    """Newline bytes in ``buf`` (an upper bound of its lines, less one)."""
    n = 0
    for i in range(buf.shape[0]):
        if buf[i] == 10:
            n += 1
    return n


@njit(cache=True)
def _line_end(buf, start, end):
    """Just after the first newline at or after ``start`` (``end`` if none)."""
    for i in range(start, end):
        if buf[i] == 10:
            return i + 1
    return end


@njit(cache=True)
def _last_line_end(buf, start, end):
    """Just after the last newline in ``buf[start:end]`` (``start`` if none)."""
    for i in range(end - 1, start - 1, -1):
        if buf[i] == 10:
            return i + 1
    return start


class LineColumns:
    """The rows of :func:`parse_lines` over one block of at most ``n_lines`` lines, and its
    symbols; after :meth:`parse`, columns of the first ``k`` lines."""

    def __init__(self, n_lines: int) -> None:
        self.out = np.empty((n_lines + 1, 8), np.int64)
        self.sym_off, self.sym_len = np.empty(SYMBOLS_MAX, np.int64), np.empty(SYMBOLS_MAX, np.int64)
        self.sym_hash = np.empty(SYMBOLS_MAX, np.int64)
        self.sym_slot = np.full(2 * SYMBOLS_MAX, -1, np.int64)

    def parse(self, buf: np.ndarray, first_line: int, ts_factor: int, recv_factor: int) -> tuple[int, int, int]:
        return parse_lines(buf, len(buf), first_line, ts_factor, recv_factor, _POW10, self.out,
                           self.out.view(np.float64), self.sym_off, self.sym_len, self.sym_hash, self.sym_slot)

    def columns(self, k: int) -> dict[str, np.ndarray]:
        """ts, recv, price, size, side (int8), snap, sym (uint32), odd, lstart, lend, lineno."""
        out, meta = self.out[:k], self.out[:k, 7]
        return {"ts": out[:, 0].copy(), "recv": out[:, 1].copy(), "price": out[:, 2].view(np.float64).copy(),
                "size": out[:, 3].view(np.float64).copy(), "side": (((meta >> 32) & 3) - 1).astype(np.int8),
                "snap": ((meta >> 34) & 1).astype(bool), "sym": (meta & 0xFFFFFFFF).astype(np.uint32),
                "odd": ((meta >> 35) & 1).astype(bool), "lstart": out[:, 4], "lend": out[:, 5], "lineno": out[:, 6]}
