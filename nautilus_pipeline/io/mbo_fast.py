"""Databento MBO to book rows without a Python object per record: our own DBN record walk over
the decompressed bytes, the records viewed as uint64 words, the order book kept in
open-addressing hash tables (numpy arrays) by one lean numba loop (six row columns), and a
second pass for the columns taken from each row's record (nine columns in the loop made it 2x
slower).

Why. ``DBNDecoder`` returns one Python object per record (2.8-4.8M records/s alone on the dev
VM), and the first numba path kept its orders in numba typed dicts (~0.5 µs a record), where
the issue asks for 5M book updates/s. After the metadata (decoded by ``DBNDecoder``: the
reference) a DBN stream is records, each starting with its length in 4-byte words and its
``rtype``. An MBO record is a fixed 56-byte C struct (the same in DBN v1-v3), so
:func:`_walk` checks every record's length and type, pure MBO blocks are one
``np.frombuffer`` (mixed ones gather their MBO records), and :func:`_mbo_block` applies them.

Records of other types: status, definitions, statistics, imbalance, OHLCV, symbol mappings,
system and error records are no ticks (the reference counts them ``ignored``; so does this
path). Any other record (trades, MBP, BBO: ticks the reference turns into rows; an MBO record
of another size, as with ``ts_out``; an unknown ``rtype``) is not misread: in the first block
the reader switches to the reference path (:class:`NotPureMbo`, before any row), later it is a
:class:`DataError` that names the record.

The rules are exactly :class:`~nautilus_pipeline.io.mbo.MboBooks` (the tests compare the two
paths row for row on the real files, rebuilt ones and random record sequences under
hypothesis). State: orders ``(instrument, order_id) -> (side, price, size)`` and levels
``(instrument, side, price) -> size`` in linear-probing tables with tombstones, grown (or
cleaned of tombstones) by :func:`_rehash` when the kernel stops before a record that could
fill one past half; memory grows with the live orders, not the file.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator

import databento_dbn as dbn
import numpy as np
from numba import njit

from ..errors import DataError
from .files import byte_blocks

RECORD = np.dtype([("length", "u1"), ("rtype", "u1"), ("publisher_id", "<u2"), ("instrument_id", "<u4"),
                   ("ts_event", "<u8"), ("order_id", "<u8"), ("price", "<i8"), ("size", "<u4"), ("flags", "u1"),
                   ("channel_id", "u1"), ("action", "u1"), ("side", "u1"), ("ts_recv", "<u8"),
                   ("ts_in_delta", "<i4"), ("sequence", "<u4")])
RTYPE_MBO = 0xA0
NOT_TICKS = (0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x20, 0x21, 0x22, 0x23, 0x24)
"""rtypes the reference reader ignores: OHLCV, status, definition, imbalance, error, symbol
mapping, system, statistics (``dbn.RType``)."""
READ_BYTES = 1 << 20
"""Bytes of an uncompressed file read at a time, as a zstd file comes (~1 MB: the rows of a
block stay in the L2 cache; one 4 MB block was 1.3x slower)."""
_UNDEF_SIZE = 4294967295
_UNDEF_PRICE = 9223372036854775807
_EXACT = 1 << 53  # below this raw / 1e9 is one correctly rounded division (io/databento.scale_prices)
_F_LAST, _F_SNAPSHOT, _F_BAD_TS_RECV = 1 << 7, 1 << 5, 1 << 3

# scal: in_snapshot, unknown_orders, orders full, orders used (full + tombstones), levels full, levels used,
# records that gave no row
_IN_SNAP, _UNKNOWN, _O_FULL, _O_USED, _L_FULL, _L_USED, _NO_ROWS = range(7)


class NotPureMbo(Exception):
    """The file holds tick records other than MBO: use the reference path."""


class MboState:
    """The order and level tables of one file, carried across blocks.

    One row of four int64 per slot, so that a probe touches one cache line (the orders table of
    a day does not fit the L2 cache: three separate arrays cost three misses a record).
    Orders: ``tag`` (0 empty, -1 tombstone, else ``(instrument + 1) << 2 | (side + 1)``),
    ``order_id``, ``price``, ``size``. Levels: ``tag`` (0, -1, else ``instrument + 1``),
    ``side``, ``price``, ``size``.
    """

    def __init__(self, orders: int = 1 << 15, levels: int = 1 << 12) -> None:
        """Initial slots (powers of two; ESH4's day holds ~11K live orders on ~1.5K levels)."""
        self.orders = np.zeros((orders, 4), np.int64)
        self.levels = np.zeros((levels, 4), np.int64)
        self.scal = np.zeros(7, np.int64)

    @property
    def unknown_orders(self) -> int:
        return int(self.scal[_UNKNOWN])

    @property
    def no_rows(self) -> int:
        """MBO records that changed no level and gave no trade (the reader's ``ignored``)."""
        return int(self.scal[_NO_ROWS])

    def grow(self) -> None:
        """Rehash a table that the kernel stopped for: twice the size (or more, until a record's
        inserts fit in half) if over a quarter full, else the same size without its tombstones."""
        s = self.scal
        self.orders = _resized(self.orders, _O_FULL, _O_USED, 1, s, True)
        self.levels = _resized(self.levels, _L_FULL, _L_USED, 2, s, False)


def _resized(tab: np.ndarray, full: int, used: int, need: int, scal: np.ndarray, orders: bool) -> np.ndarray:
    cap = len(tab)
    if scal[used] + need <= cap // 2:
        return tab
    if 4 * scal[full] > cap:
        cap *= 2
    while scal[full] + need > cap // 2:
        cap *= 2
    scal[used] = scal[full]
    return _rehash(tab, cap, orders)


@njit(cache=True, inline="always")
def _mix(z):
    """splitmix64's finaliser: every input bit moves every output bit (prices are multiples
    of a tick, order ids nearly sequential: the low bits alone would collide)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(cache=True, inline="always")
def _hash(a, b, c, mask):
    h = _mix(np.uint64(a) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(b))
    return np.int64(_mix(h + np.uint64(c)) & np.uint64(mask))


@njit(cache=True)
def _rehash(tab, cap, orders):
    new = np.zeros((cap, 4), np.int64)
    mask = cap - 1
    for i in range(tab.shape[0]):
        tag = tab[i, 0]
        if tag <= 0:
            continue
        if orders:
            j = _hash(tag >> 2, tab[i, 1], 0, mask)
        else:
            j = _hash(tag, tab[i, 1], tab[i, 2], mask)
        while new[j, 0] != 0:
            j = (j + 1) & mask
        new[j] = tab[i]
    return new


@njit(cache=True, inline="always")
def _find_order(tab, iid, oid):
    """Slot of (iid, oid), or ``-1 - slot`` where it would go (the first tombstone on the way)."""
    mask = tab.shape[0] - 1
    want = iid + 1
    j = _hash(want, oid, 0, mask)
    free = -1
    while True:
        tag = tab[j, 0]
        if tag == 0:
            return -1 - (free if free >= 0 else j)
        if tag > 0:
            if tab[j, 1] == oid and (tag >> 2) == want:
                return j
        elif free < 0:
            free = j
        j = (j + 1) & mask


@njit(cache=True, inline="always")
def _find_level(tab, iid, side, px):
    mask = tab.shape[0] - 1
    want = iid + 1
    j = _hash(want, side, px, mask)
    free = -1
    while True:
        tag = tab[j, 0]
        if tag == 0:
            return -1 - (free if free >= 0 else j)
        if tag > 0:
            if tab[j, 2] == px and tab[j, 1] == side and tag == want:
                return j
        elif free < 0:
            free = j
        j = (j + 1) & mask


@njit(cache=True, inline="always")
def _level(tab, scal, iid, side, px, change):
    """Apply ``change`` to a level; its new size (0: removed)."""
    j = _find_level(tab, iid, side, px)
    if j >= 0:
        size = tab[j, 3] + change
        if size > 0:
            tab[j, 3] = size
            return size
        tab[j, 0] = -1
        scal[_L_FULL] -= 1
        return 0
    if change <= 0:
        return 0
    j = -1 - j
    if tab[j, 0] == 0:
        scal[_L_USED] += 1
    tab[j, 0] = iid + 1
    tab[j, 1] = side
    tab[j, 2] = px
    tab[j, 3] = change
    scal[_L_FULL] += 1
    return change


@njit(cache=True, inline="always")
def _clear(orders, levels, scal, iid):
    want = iid + 1
    for j in range(orders.shape[0]):
        if orders[j, 0] > 0 and (orders[j, 0] >> 2) == want:
            orders[j, 0] = -1
            scal[_O_FULL] -= 1
    for j in range(levels.shape[0]):
        if levels[j, 0] == want:
            levels[j, 0] = -1
            scal[_L_FULL] -= 1


@njit(cache=True, inline="always")
def _row(k, r, kind, side, px, size, event, o_rec, o_kind, o_side, o_px, o_size, o_event):
    o_rec[k] = r
    o_kind[k] = kind
    o_side[k] = side
    o_px[k] = px
    o_size[k] = size
    o_event[k] = event
    return k + 1


@njit(cache=True)
def _finish(words, o_rec, o_px, o_size, ts, recv, iid, price, size):
    """The columns taken from each row's record (a second pass: the book loop stays lean, it
    was 2x slower writing nine columns); prices as ``scale_prices`` (beyond 2**53: NaN here,
    counted, and redone exactly by the caller), sizes float64 (DBN's undefined size: NaN)."""
    big = 0
    for k in range(o_rec.shape[0]):
        r = o_rec[k]
        w4 = words[r, 4]
        ts[k] = np.int64(words[r, 1])
        recv[k] = -1 if (w4 >> np.uint64(32)) & np.uint64(_F_BAD_TS_RECV) else np.int64(words[r, 5])
        iid[k] = np.uint32(words[r, 0] >> np.uint64(32))
        px = o_px[k]
        if px == np.int64(9223372036854775807):
            price[k] = np.nan
        elif -_EXACT < px < _EXACT:
            price[k] = np.float64(px) / 1e9
        else:
            price[k] = np.nan
            big += 1
        size[k] = np.nan if o_size[k] == _UNDEF_SIZE else np.float64(o_size[k])
    return big


@njit(cache=True)
def _mbo_block(words, trades, r0, k, orders, levels, scal, o_rec, o_kind, o_side, o_px, o_size, o_event):
    """Rows of records ``r0..`` of ``words`` (the records as 7 little-endian u64 words; rules:
    ``io/mbo.py``); kinds 0 trade, 2 book. Returns (next record, rows): it stops early before a
    record that might fill a table past half (the caller rehashes and calls again from there);
    records that give no row are counted in ``scal``."""
    undef = np.int64(9223372036854775807)
    o_half = orders.shape[0] // 2
    l_half = levels.shape[0] // 2
    n = words.shape[0]
    for r in range(r0, n):
        if scal[_O_USED] + 1 > o_half or scal[_L_USED] + 2 > l_half:
            return r, k
        start = k
        w0, w4 = words[r, 0], words[r, 4]
        iid = np.int64(w0 >> np.uint64(32))
        oid = np.int64(words[r, 2])
        px = np.int64(words[r, 3])
        size = np.int64(w4 & np.uint64(0xFFFFFFFF))
        flags = np.int64((w4 >> np.uint64(32)) & np.uint64(0xFF))
        act = np.int64((w4 >> np.uint64(48)) & np.uint64(0xFF))
        sd = np.int64(w4 >> np.uint64(56))
        side = 1 if sd == 66 else (-1 if sd == 65 else 0)  # 'B', 'A'
        if trades and act == 84:  # 'T': the trade, aggressor side as sent
            k = _row(k, r, 0, side, px, size, -1, o_rec, o_kind, o_side, o_px, o_size, o_event)
        snap = (flags & _F_SNAPSHOT) != 0
        cleared = False
        if snap and scal[_IN_SNAP] == 0:
            _clear(orders, levels, scal, iid)
            k = _row(k, r, 2, 0, undef, 0, 0, o_rec, o_kind, o_side, o_px, o_size, o_event)
            cleared = True
        scal[_IN_SNAP] = 1 if snap else 0
        if act == 82:  # 'R' clear
            _clear(orders, levels, scal, iid)
            if not cleared:
                k = _row(k, r, 2, 0, undef, 0, 0, o_rec, o_kind, o_side, o_px, o_size, o_event)
        elif act == 65 and side != 0:  # 'A' add
            j = _find_order(orders, iid, oid)
            if j >= 0:  # a re-add of a live id replaces it
                p_side, p_px, p_sz = (orders[j, 0] & 3) - 1, orders[j, 2], orders[j, 3]
                lv = _level(levels, scal, iid, p_side, p_px, -p_sz)
                k = _row(k, r, 2, p_side, p_px, lv, 0, o_rec, o_kind, o_side, o_px, o_size, o_event)
            else:
                j = -1 - j
                if orders[j, 0] == 0:
                    scal[_O_USED] += 1
                orders[j, 1] = oid
                scal[_O_FULL] += 1
            orders[j, 0] = ((iid + 1) << 2) | (side + 1)
            orders[j, 2] = px
            orders[j, 3] = size
            lv = _level(levels, scal, iid, side, px, size)
            k = _row(k, r, 2, side, px, lv, 0, o_rec, o_kind, o_side, o_px, o_size, o_event)
        elif act == 67 or act == 77:  # 'C' cancel, 'M' modify
            j = _find_order(orders, iid, oid)
            if j < 0:
                scal[_UNKNOWN] += 1
            else:
                p_side, p_px, p_sz = (orders[j, 0] & 3) - 1, orders[j, 2], orders[j, 3]
                if act == 67:
                    left = p_sz - size
                    if left > 0:
                        orders[j, 3] = left
                    else:
                        orders[j, 0] = -1
                        scal[_O_FULL] -= 1
                    lv = _level(levels, scal, iid, p_side, p_px, -min(size, p_sz))
                    k = _row(k, r, 2, p_side, p_px, lv, 0, o_rec, o_kind, o_side, o_px, o_size, o_event)
                else:
                    new_side = np.int64(side) if side != 0 else p_side
                    orders[j, 0] = ((iid + 1) << 2) | (new_side + 1)
                    orders[j, 2] = px
                    orders[j, 3] = size
                    if new_side == p_side and px == p_px:
                        lv = _level(levels, scal, iid, p_side, p_px, size - p_sz)
                        k = _row(k, r, 2, p_side, p_px, lv, 0, o_rec, o_kind, o_side, o_px, o_size, o_event)
                    else:
                        lv = _level(levels, scal, iid, p_side, p_px, -p_sz)
                        k = _row(k, r, 2, p_side, p_px, lv, 0, o_rec, o_kind, o_side, o_px, o_size, o_event)
                        lv = _level(levels, scal, iid, new_side, px, size)
                        k = _row(k, r, 2, new_side, px, lv, 0, o_rec, o_kind, o_side, o_px, o_size, o_event)
        if k == start:
            scal[_NO_ROWS] += 1
        elif (flags & _F_LAST) and o_kind[k - 1] == 2:
            o_event[k - 1] = 1  # the last book row of an exchange event
    return n, k


def mbo_rows(words: np.ndarray, state: MboState, trades: bool) -> dict[str, np.ndarray]:
    """Row columns of a block of MBO records (``words``: :func:`record_words`): ``rec`` (index
    of the record in the block), ``kind``, ``side`` (book side, or the trade's aggressor),
    ``price`` (float64, as ``scale_prices``), ``size`` (float64, NaN for DBN's undefined
    size), ``ts_ns``, ``ts_recv_ns``, ``instrument_id``, ``event`` (the book rows' ``trade_id``).
    Records that give no row are counted in ``state.no_rows``."""
    n = len(words)
    cap = 3 * n + 1  # a record gives at most 3 rows (a clear and the two levels of a move)
    o_rec, o_kind, o_side = np.empty(cap, np.int64), np.empty(cap, np.uint8), np.empty(cap, np.int8)
    o_px, o_size, o_event = np.empty(cap, np.int64), np.empty(cap, np.int64), np.empty(cap, np.int64)
    r, k = 0, 0
    while True:
        r, k = _mbo_block(words, trades, r, k, state.orders, state.levels, state.scal,
                          o_rec, o_kind, o_side, o_px, o_size, o_event)
        if r >= n:
            break
        state.grow()
    rec, raw = o_rec[:k], o_px[:k]
    out = {"rec": rec, "kind": o_kind[:k], "side": o_side[:k], "event": o_event[:k],
           "ts_ns": np.empty(k, np.int64), "ts_recv_ns": np.empty(k, np.int64),
           "instrument_id": np.empty(k, np.uint32), "price": np.empty(k), "size": np.empty(k)}
    big = _finish(words, rec, raw, o_size[:k], out["ts_ns"], out["ts_recv_ns"], out["instrument_id"],
                  out["price"], out["size"])
    if big:  # prices beyond 2**53: exact Python division
        for at in np.flatnonzero((raw != _UNDEF_PRICE) & (np.abs(raw) >= _EXACT)):
            out["price"][at] = int(raw[at]) / 10**9
    return out


def record_words(recs: np.ndarray) -> np.ndarray:
    """MBO records as an (n, 7) uint64 array (copied only when not 8-byte aligned)."""
    raw = recs.view(np.uint8).reshape(-1) if recs.flags.c_contiguous else np.ascontiguousarray(recs).view(np.uint8)
    words = raw.view(np.uint64) if raw.ctypes.data % 8 == 0 else raw.copy().view(np.uint64)
    return words.reshape(len(recs), RECORD.itemsize // 8)


@njit(cache=True)
def _walk(buf, end, mbo_len, not_ticks, offsets):
    """Records in ``buf[:end]``: fills ``offsets`` with the MBO records' offsets; returns
    (bytes consumed, records, MBO records, ignored records, offset of a record we do not read
    or -1). A record cut at ``end`` is left for the next block."""
    pos = 0
    count = 0
    n_mbo = 0
    ignored = 0
    while pos < end:
        length = np.int64(buf[pos]) * 4
        if length == 0:
            return pos, count, n_mbo, ignored, pos
        if pos + length > end:
            break
        rtype = buf[pos + 1]
        if rtype == RTYPE_MBO and length == mbo_len:
            offsets[n_mbo] = pos
            n_mbo += 1
        elif not_ticks[rtype]:
            ignored += 1
        else:
            return pos, count, n_mbo, ignored, pos
        count += 1
        pos += length
    return pos, count, n_mbo, ignored, -1


class MboBlock:
    """The MBO records of one block, their file record numbers, and how many records it held."""

    def __init__(self, recs: np.ndarray, recno: np.ndarray | None, first: int, count: int, ignored: int) -> None:
        self.recs = recs
        self.words = record_words(recs)
        self.recno = recno  # None: pure MBO, record numbers first+1 ... first+len(recs)
        self.first = first
        self.count = count
        self.ignored = ignored

    def record_numbers(self, index: np.ndarray) -> np.ndarray:
        """1-based file record numbers of the records at ``index`` in :attr:`recs`."""
        return self.first + 1 + index if self.recno is None else self.recno[index]


def record_blocks(path: str) -> tuple[dbn.Metadata, Iterator[MboBlock]]:
    """The metadata and an iterator of MBO record blocks; NotPureMbo when the first block holds
    tick records this path does not read (the reference reads them)."""
    stream = byte_blocks(path, READ_BYTES)
    head = b""
    try:
        for b in stream:  # usually the first block holds the whole metadata: no copy then
            head = head + b if head else b
            if len(head) >= 8 and (head[:3] != b"DBN" or len(head) >= 8 + struct.unpack("<I", head[4:8])[0]):
                break
        if len(head) < 8 or head[:3] != b"DBN":
            raise NotPureMbo("no DBN header")
        meta_len = 8 + struct.unpack("<I", head[4:8])[0]
        if len(head) < meta_len:
            raise NotPureMbo("cut in the metadata")
        dec = dbn.DBNDecoder()
        try:
            dec.write(bytes(head[:meta_len]))
            meta = dec.decode()[0]
        except BaseException as e:  # a Rust panic is a BaseException
            if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
                raise
            raise NotPureMbo(str(e)) from None
        if not isinstance(meta, dbn.Metadata):
            raise NotPureMbo("no metadata")
        blocks = _blocks(path, memoryview(head)[meta_len:], stream)
        first = next(blocks, None)
    except (NotPureMbo, DataError):
        stream.close()
        raise NotPureMbo("not read here") from None
    except BaseException:
        stream.close()
        raise

    def all_blocks() -> Iterator[MboBlock]:
        try:
            if first is not None:
                yield first
            yield from blocks
        finally:
            stream.close()

    return meta, all_blocks()


_NOT_TICKS = np.zeros(256, np.bool_)
_NOT_TICKS[list(NOT_TICKS)] = True


def _blocks(path: str, rest: bytes | memoryview, stream: Iterator[bytes]) -> Iterator[MboBlock]:
    """Blocks of records: ``rest`` (the bytes after the metadata), then the stream's; a record
    cut at a block's end is carried to the next."""
    carry = b""
    first = 0  # records before this block
    for b in itertools.chain((rest,), stream):
        data = carry + b if carry else b
        if not data:
            continue
        buf = np.frombuffer(data, np.uint8)
        offsets = np.empty(len(data) // RECORD.itemsize + 1, np.int64)
        used, count, n_mbo, ignored, stop = _walk(buf, len(buf), RECORD.itemsize, _NOT_TICKS, offsets)
        if stop >= 0:
            if first == 0:
                raise NotPureMbo("other tick records")
            raise DataError(f"{path}: DBN record {first + count + 1:,} is of rtype 0x{int(buf[stop + 1]):02x} and "
                            f"{int(buf[stop]) * 4} bytes among MBO records, which the MBO path does not read; "
                            "split the file by schema (or read it with fast_mbo=False)")
        carry = bytes(data[used:])
        if not count:
            continue
        if n_mbo == count:
            recs = np.frombuffer(data, dtype=RECORD, count=n_mbo)
            recno = None
        else:
            recs = buf[offsets[:n_mbo, None] + np.arange(RECORD.itemsize)].reshape(-1).view(RECORD)
            recno = _numbers(buf, offsets[:n_mbo], first)
        yield MboBlock(recs, recno, first, count, ignored)
        first += count
    if carry:
        raise DataError(f"{path}: the DBN file ends in the middle of a record ({len(carry)} bytes left); "
                        "it is truncated: re-download it")


@njit(cache=True)
def _numbers(buf, offsets, first):
    """1-based file record numbers of the records at ``offsets`` (sorted record starts)."""
    out = np.empty(offsets.shape[0], np.int64)
    p = 0
    no = first
    i = 0
    while i < offsets.shape[0]:
        no += 1
        if p == offsets[i]:
            out[i] = no
            i += 1
        p += np.int64(buf[p]) * 4
    return out
