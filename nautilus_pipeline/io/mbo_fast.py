"""Databento MBO to book rows without a Python object per record: the DBN records read as a
numpy structured array, the order book kept in numba typed dicts.

Why. ``DBNDecoder`` returns one Python object per record and ``io/mbo.py``'s bookkeeping is a
few dict operations per record in Python: about 0.2M records/s on the dev VM, where the issue
asks for 5M book updates/s. An MBO record is a fixed 56-byte C struct (the same in DBN v1-v3),
so after the metadata (decoded by ``DBNDecoder``, the reference) a block of records is one
``np.frombuffer`` and the order book one numba loop. The rules are exactly
:class:`~nautilus_pipeline.io.mbo.MboBooks` (the tests compare the two paths row for row on the
real files and on rebuilt ones); that class stays the reference and the fallback for files that
are not pure MBO (another record size in a block), which this path refuses before its first
chunk so that the reader can switch.

State: orders ``(instrument, order_id) -> (side, price, size)`` and levels ``(instrument,
side, price) -> size``, carried across blocks; memory grows with the live orders, not the file.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import databento_dbn as dbn
import numpy as np
from numba import njit, types
from numba.typed import Dict

from ..errors import DataError
from .files import decoding_errors, open_stream

RECORD = np.dtype([("length", "u1"), ("rtype", "u1"), ("publisher_id", "<u2"), ("instrument_id", "<u4"),
                   ("ts_event", "<u8"), ("order_id", "<u8"), ("price", "<i8"), ("size", "<u4"), ("flags", "u1"),
                   ("channel_id", "u1"), ("action", "u1"), ("side", "u1"), ("ts_recv", "<u8"),
                   ("ts_in_delta", "<i4"), ("sequence", "<u4")])
RTYPE_MBO = 0xA0
BLOCK_RECORDS = 1 << 16

_ORDER_KEY = types.UniTuple(types.int64, 2)
_ORDER_VAL = types.UniTuple(types.int64, 3)
_LEVEL_KEY = types.UniTuple(types.int64, 3)


class NotPureMbo(Exception):
    """The file holds records other than MBO: use the reference path."""


def new_state():
    """(orders, levels, scalars [in_snapshot, unknown_orders]) for :func:`mbo_rows`."""
    orders = Dict.empty(key_type=_ORDER_KEY, value_type=_ORDER_VAL)
    levels = Dict.empty(key_type=_LEVEL_KEY, value_type=types.int64)
    return orders, levels, np.zeros(2, dtype=np.int64)


@njit(cache=True)
def _level(levels, iid, side, px, change, o_side, o_px, o_size, k):
    key = (iid, side, px)
    size = levels.get(key, 0) + change
    if size > 0:
        levels[key] = size
    else:
        if key in levels:
            del levels[key]
        size = 0
    o_side[k] = side
    o_px[k] = px
    o_size[k] = size
    return k + 1


@njit(cache=True)
def _clear(orders, levels, iid):
    drop = [k for k in orders.keys() if k[0] == iid]
    for k in drop:
        del orders[k]
    lv = [k for k in levels.keys() if k[0] == iid]
    for k in lv:
        del levels[k]


@njit(cache=True)
def _mbo_rows(iid_a, oid_a, px_a, sz_a, flags_a, action_a, side_a, trades, orders, levels, scal,
              o_rec, o_kind, o_side, o_px, o_size, o_trade_side, produced):
    """Rows of every record (see ``io/mbo.py`` for the rules); kinds: 0 trade, 2 book."""
    undef = np.int64(9223372036854775807)
    k = 0
    for r in range(iid_a.shape[0]):
        start = k
        iid = np.int64(iid_a[r])
        flags = flags_a[r]
        act = action_a[r]
        sd = side_a[r]
        side = 1 if sd == 66 else (-1 if sd == 65 else 0)  # 'B', 'A'
        oid = np.int64(oid_a[r])
        px = px_a[r]
        size = np.int64(sz_a[r])
        if trades and act == 84:  # 'T': the trade, aggressor side as sent
            o_rec[k] = r
            o_kind[k] = 0
            o_side[k] = 0
            o_px[k] = px
            o_size[k] = size
            o_trade_side[k] = side
            k += 1
        snap = (flags & 32) != 0
        clear_row = -1
        if snap and scal[0] == 0:
            _clear(orders, levels, iid)
            o_rec[k] = r
            o_kind[k] = 2
            o_side[k] = 0
            o_px[k] = undef
            o_size[k] = 0
            clear_row = k
            k += 1
        scal[0] = 1 if snap else 0
        if act == 82:  # 'R' clear
            _clear(orders, levels, iid)
            if clear_row != k - 1 or clear_row < 0:
                o_rec[k] = r
                o_kind[k] = 2
                o_side[k] = 0
                o_px[k] = undef
                o_size[k] = 0
                k += 1
        elif act == 65 and side != 0:  # 'A' add
            key = (iid, oid)
            if key in orders:
                p = orders[key]
                k = _level(levels, iid, p[0], p[1], -p[2], o_side, o_px, o_size, k)
                o_rec[k - 1] = r
                o_kind[k - 1] = 2
            orders[key] = (np.int64(side), px, size)
            k = _level(levels, iid, side, px, size, o_side, o_px, o_size, k)
            o_rec[k - 1] = r
            o_kind[k - 1] = 2
        elif act == 67 or act == 77:  # 'C' cancel, 'M' modify
            key = (iid, oid)
            if key not in orders:
                scal[1] += 1
            else:
                p = orders[key]
                o_s, o_p, o_z = p[0], p[1], p[2]
                if act == 67:
                    left = o_z - size
                    if left > 0:
                        orders[key] = (o_s, o_p, left)
                    else:
                        del orders[key]
                    k = _level(levels, iid, o_s, o_p, -min(size, o_z), o_side, o_px, o_size, k)
                    o_rec[k - 1] = r
                    o_kind[k - 1] = 2
                else:
                    new_side = np.int64(side) if side != 0 else o_s
                    orders[key] = (new_side, px, size)
                    if new_side == o_s and px == o_p:
                        k = _level(levels, iid, o_s, o_p, size - o_z, o_side, o_px, o_size, k)
                        o_rec[k - 1] = r
                        o_kind[k - 1] = 2
                    else:
                        k = _level(levels, iid, o_s, o_p, -o_z, o_side, o_px, o_size, k)
                        o_rec[k - 1] = r
                        o_kind[k - 1] = 2
                        k = _level(levels, iid, new_side, px, size, o_side, o_px, o_size, k)
                        o_rec[k - 1] = r
                        o_kind[k - 1] = 2
        produced[r] = k > start
    return k


def mbo_rows(recs: np.ndarray, state, trades: bool) -> dict[str, np.ndarray]:
    """Rows of a block of MBO records: ``rec`` (index into ``recs``), ``kind``, ``side``
    (book side, or the trade's aggressor), raw ``price``, ``size``; ``produced`` per record."""
    orders, levels, scal = state
    n = len(recs)
    cap = 3 * n + 1
    o_rec = np.empty(cap, np.int64)
    o_kind = np.empty(cap, np.uint8)
    o_side = np.empty(cap, np.int64)
    o_px = np.empty(cap, np.int64)
    o_size = np.empty(cap, np.int64)
    o_trade = np.zeros(cap, np.int64)
    produced = np.zeros(n, np.bool_)
    k = _mbo_rows(recs["instrument_id"], recs["order_id"], recs["price"], recs["size"], recs["flags"],
                  recs["action"], recs["side"], trades, orders, levels, scal, o_rec, o_kind, o_side, o_px, o_size,
                  o_trade, produced)
    side = np.where(o_kind[:k] == 0, o_trade[:k], o_side[:k]).astype(np.int8)
    return {"rec": o_rec[:k], "kind": o_kind[:k], "side": side, "price": o_px[:k], "size": o_size[:k],
            "produced": produced}


def record_blocks(path: str) -> tuple[dbn.Metadata, Iterator[np.ndarray]]:
    """The metadata and an iterator of MBO record blocks (structured arrays); NotPureMbo when
    the first block holds other records."""
    stream = open_stream(path)
    with decoding_errors(path):
        head = stream.read(8)
        if len(head) < 8 or head[:3] != b"DBN":
            stream.close()
            raise NotPureMbo("no DBN header")
        meta_len = struct.unpack("<I", head[4:8])[0]
        meta_bytes = stream.read(meta_len)
    dec = dbn.DBNDecoder()
    try:
        dec.write(head + meta_bytes)
        meta = dec.decode()[0]
    except BaseException as e:  # a Rust panic is a BaseException
        stream.close()
        if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
            raise
        raise NotPureMbo(str(e)) from None
    try:
        first = _block(stream, path)
    except DataError:  # not a whole number of MBO records: another schema (or cut: the reference says)
        stream.close()
        raise NotPureMbo("not only MBO records") from None
    if first is None or not _pure(first):
        stream.close()
        raise NotPureMbo("not only MBO records")

    def blocks() -> Iterator[np.ndarray]:
        try:
            yield first
            while True:
                b = _block(stream, path)
                if b is None:
                    return
                if not _pure(b):
                    raise DataError(f"{path}: MBO records mixed with other record types after the first "
                                    f"{BLOCK_RECORDS:,}; split the file by schema")
                yield b
        finally:
            stream.close()

    return meta, blocks()


def _pure(b: np.ndarray) -> bool:
    return bool((b["length"] == RECORD.itemsize // 4).all() and (b["rtype"] == RTYPE_MBO).all())


def _block(stream, path: str) -> np.ndarray | None:
    with decoding_errors(path):
        data = stream.read(BLOCK_RECORDS * RECORD.itemsize)
    if not data:
        return None
    if len(data) % RECORD.itemsize:
        raise DataError(f"{path}: the DBN file ends in the middle of a record ({len(data) % RECORD.itemsize} "
                        "bytes left); it is truncated: re-download it")
    return np.frombuffer(data, dtype=RECORD)
