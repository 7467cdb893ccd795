"""LOBSTER message + orderbook files (rebuilt faithfully: a simulated limit order book writes both
files in LOBSTER's documented layout), read as trades and book rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from book_reference import reference

from nautilus_pipeline.errors import ConfigError
from nautilus_pipeline.events import KIND_BOOK, KIND_TRADE
from nautilus_pipeline.io import Replay, Source, detect_format
from nautilus_pipeline.io.lobster import LobsterReader
from nautilus_pipeline.kernels.book import ACTION_CLEAR, ACTION_SET

DEPTH = 3


def simulate(tmp_path: Path, n: int = 400, seed: int = 2) -> tuple[Path, list[dict], np.ndarray]:
    """Events of a small order book and the top-DEPTH book after each, as LOBSTER writes them."""
    rng = np.random.default_rng(seed)
    orders: dict[int, list] = {}  # id -> [direction, price (x10000), size]
    events, books = [], []
    t, oid = 34_200.0, 1
    for _ in range(n):
        t += float(rng.exponential(0.01))
        live = [o for o in orders if orders[o][2] > 0]
        r = rng.random()
        if r < 0.5 or len(live) < 4:
            d = int(rng.choice([-1, 1]))
            px = (1_000_000 + (1 if d == -1 else -1) * int(rng.integers(1, 6)) * 100)
            sz = int(rng.integers(1, 10)) * 100
            orders[oid] = [d, px, sz]
            events.append({"time": t, "type": 1, "id": oid, "size": sz, "price": px, "dir": d})
            oid += 1
        else:
            o = int(rng.choice(live))
            d, px, sz = orders[o]
            typ = int(rng.choice([2, 3, 4, 5 if rng.random() < 0.1 else 4]))
            q = sz if typ in (3,) else min(sz, int(rng.integers(1, 5)) * 100)
            if typ == 5:  # hidden execution: not in the book
                events.append({"time": t, "type": 5, "id": 0, "size": 100, "price": px, "dir": d})
            else:
                orders[o][2] -= q
                events.append({"time": t, "type": typ, "id": o, "size": q, "price": px, "dir": d})
        asks = sorted({o[1] for o in orders.values() if o[0] == -1 and o[2] > 0})[:DEPTH]
        bids = sorted({o[1] for o in orders.values() if o[0] == 1 and o[2] > 0}, reverse=True)[:DEPTH]
        row = []
        for i in range(DEPTH):
            a = asks[i] if i < len(asks) else None
            b = bids[i] if i < len(bids) else None
            az = sum(o[2] for o in orders.values() if o[0] == -1 and o[1] == a) if a else 0
            bz = sum(o[2] for o in orders.values() if o[0] == 1 and o[1] == b) if b else 0
            row += [a if a else 9_999_999_999, az, b if b else -9_999_999_999, bz]
        books.append(row)
    msg = tmp_path / "TEST_2012-06-21_34200000_57600000_message_3.csv"
    msg.write_text("".join(f"{e['time']:.9f},{e['type']},{e['id']},{e['size']},{e['price']},{e['dir']}\n" for e in events))
    (tmp_path / "TEST_2012-06-21_34200000_57600000_orderbook_3.csv").write_text(
        "".join(",".join(map(str, r)) + "\n" for r in books))
    return msg, events, np.array(books, dtype=float)


def read(path: Path, **options):
    r = LobsterReader(path, **options)
    chunks = list(r.chunks(97))
    cols = {k: np.concatenate([c.column(k) for c in chunks]) for k in ("ts_ns", "kind", "side", "price", "size")}
    return cols, np.concatenate([c.records for c in chunks]), r


def test_detected_by_name_and_shape(tmp_path: Path) -> None:
    msg, _, _ = simulate(tmp_path, 20)
    assert detect_format(msg) == "lobster"
    other = tmp_path / "events.csv"
    other.write_text(msg.read_text())
    assert detect_format(other) == "lobster"


def test_executions_are_trades_with_the_aggressor_opposite_the_resting_order(tmp_path: Path) -> None:
    msg, events, _ = simulate(tmp_path)
    cols, rec, _ = read(msg)
    trades = cols["kind"] == KIND_TRADE
    want = [(i + 1, -e["dir"], e["price"] / 10_000, float(e["size"])) for i, e in enumerate(events) if e["type"] in (4, 5)]
    got = list(zip(rec[trades].tolist(), cols["side"][trades].tolist(), cols["price"][trades].tolist(),
                   cols["size"][trades].tolist(), strict=True))
    assert got == want and len(want) > 20


def test_after_each_event_the_book_is_its_orderbook_row(tmp_path: Path) -> None:
    msg, events, books = simulate(tmp_path)
    cols, rec, r = read(msg)
    b = cols["kind"] == KIND_BOOK
    side, price, size = cols["side"][b], cols["price"][b], cols["size"][b]
    action = np.where(side == 0, ACTION_CLEAR, ACTION_SET)
    _, lv = reference(side.tolist(), price.tolist(), size.tolist(), action.tolist(), levels=DEPTH)
    brec = rec[b]
    checked = 0
    for line in range(1, len(events) + 1):
        rows = np.flatnonzero(brec == line)
        if not rows.size:
            continue
        got = lv[rows[-1]]
        row = books[line - 1].reshape(DEPTH, 4)
        want = np.full((4, DEPTH), np.nan)
        for i in range(DEPTH):
            ap, az, bp, bz = row[i]
            if bp > -9e9:
                want[0, i], want[1, i] = bp / 1e4, bz
            if ap < 9e9:
                want[2, i], want[3, i] = ap / 1e4, az
        assert np.array_equal(got, want, equal_nan=True), line
        checked += 1
    assert checked > 200 and not r.book_missing


def test_times_are_the_trading_dates_local_time_in_utc(tmp_path: Path) -> None:
    msg, events, _ = simulate(tmp_path, 30)
    cols, _, _ = read(msg)
    first = 1_340_236_800 * 10**9 + 4 * 3600 * 10**9  # 2012-06-21 00:00 EDT in UTC ns
    assert cols["ts_ns"][0] == first + round(events[0]["time"] * 1e9)
    est, _, _ = read(msg, utc_offset_hours=-5)
    assert est["ts_ns"][0] - cols["ts_ns"][0] == 3600 * 10**9
    winter = msg.with_name(msg.name.replace("2012-06-21", "2012-01-20"))  # EST: UTC-5 by default
    msg.rename(winter)
    msg.with_name(msg.name.replace("message", "orderbook")).rename(
        winter.with_name(winter.name.replace("message", "orderbook")))
    jan, _, r = read(winter)
    assert r.utc_offset_hours == -5.0
    assert jan["ts_ns"][0] == (1_327_017_600 + 5 * 3600) * 10**9 + round(events[0]["time"] * 1e9)


def test_without_the_orderbook_file_only_trades(tmp_path: Path) -> None:
    msg, events, _ = simulate(tmp_path)
    (tmp_path / msg.name.replace("message", "orderbook")).unlink()
    cols, _, r = read(msg)
    assert r.book_missing and (cols["kind"] == KIND_TRADE).all()
    assert len(cols["kind"]) == sum(e["type"] in (4, 5) for e in events)


def test_the_date_is_needed_and_bad_rows_are_refused(tmp_path: Path) -> None:
    msg, _, _ = simulate(tmp_path, 50)
    plain = tmp_path / "events.csv"
    plain.write_text(msg.read_text())
    with pytest.raises(ConfigError, match="give the trading date"):
        LobsterReader(plain)
    lines = msg.read_text().splitlines()
    lines[10] = lines[10].replace(",1,", ",9,", 1) if ",1," in lines[10] else lines[10][:-2] + ",0"
    msg.write_text("\n".join(lines) + "\n")
    r = Replay([Source(msg, policy="reject")])
    list(r.iter_arrays())
    t = r.accounting.total
    assert t.rejected == 1 and t.read == t.delivered + 1
