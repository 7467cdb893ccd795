"""Binance depth updates and REST snapshots of real captures as book rows (``binance_feed``,
``book=True``): the U/u/pu sequencing rules, gaps counted, resynchronisation from a snapshot.

The check that the book is right comes from the capture itself: a ``bookTicker`` message carries
the order-book update id ``u`` it reflects, so wherever a depth update ends at the same id, the
best bid and ask of the book rebuilt from the depth stream must equal the ticker's.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import orjson
import pytest

from nautilus_pipeline.events import KIND_BOOK
from nautilus_pipeline.io import Replay, Source
from nautilus_pipeline.io.binance import BinanceFeedReader
from nautilus_pipeline.kernels.book import (
    ACTION_CLEAR,
    ACTION_SET,
    book_depth_scan,
    book_update,
    new_book_state,
)

SPOT = "binance-feed-spot-ethusdt_20240808.jsonl.gz"
USDM = "binance-feed-usdm-btcusdt_20240808.jsonl.gz"


def book_rows(path: Path):
    r = BinanceFeedReader(path, book=True)
    chunks = list(r.chunks())
    cols = {k: np.concatenate([c.column(k) for c in chunks]) for k in ("kind", "side", "price", "size", "ts_recv_ns")}
    rec = np.concatenate([c.records for c in chunks])
    b = cols["kind"] == KIND_BOOK
    return {k: v[b] for k, v in cols.items()}, rec[b], r


def tops(rows):
    side = rows["side"]
    lv = np.empty((len(side), 4, 1))
    action = np.where(side == 0, ACTION_CLEAR, ACTION_SET).astype(np.uint8)
    book_update(new_book_state(4096), side, rows["price"], rows["size"], action, levels_out=lv)
    return lv[:, :, 0]


def messages(path: Path):
    with gzip.open(path) as fh:
        for n, line in enumerate(fh, start=1):
            yield n, line, orjson.loads(line.partition(b" ")[2])


def ticker_agreement(path: Path) -> tuple[int, int]:
    rows, rec, _ = book_rows(path)
    top = tops(rows)
    last_of_line = {int(x): i for i, x in enumerate(rec)}
    depth_u, ticker = {}, {}
    for n, _, msg in messages(path):
        s = msg.get("stream", "")
        if "@depth" in s:
            depth_u[n] = msg["data"]["u"]
        elif s.endswith("@bookTicker"):
            ticker[msg["data"]["u"]] = (float(msg["data"]["b"]), float(msg["data"]["a"]))
    pairs = [(last_of_line[n], ticker[u]) for n, u in depth_u.items() if n in last_of_line and u in ticker]
    agree = sum((top[i, 0], top[i, 2]) == q for i, q in pairs)
    return len(pairs), agree


def test_spot_depth_book_matches_every_book_ticker_of_the_same_update(sample_dir: Path) -> None:
    n, agree = ticker_agreement(sample_dir / SPOT)
    assert n == 577 and agree == n


@pytest.mark.slow
def test_usdm_depth_book_matches_every_book_ticker_of_the_same_update(shared_data: Path) -> None:
    n, agree = ticker_agreement(shared_data / USDM)
    assert n == 629 and agree == n


def test_book_rows_are_accounted_and_the_capture_has_no_gap(sample_dir: Path) -> None:
    r = Replay([Source(sample_dir / SPOT, options={"book": True})])
    kinds = np.concatenate([b["kind"] for b in r.iter_arrays()])
    t = r.accounting.total
    assert t.read == t.delivered == len(kinds) and (kinds == KIND_BOOK).sum() == 108_803
    assert sum(r.accounting.book_gaps.values()) == 0
    assert sum(r.accounting.ignored.values()) == 2  # two depth updates older than the snapshot
    plain = Replay([Source(sample_dir / SPOT)])
    assert sum(len(b["kind"]) for b in plain.iter_arrays()) == 30_183  # book=False: as before


def write(path: Path, lines: list[bytes]) -> Path:
    with gzip.open(path, "wb") as fh:
        fh.writelines(lines)
    return path


def test_a_missing_update_is_a_gap_then_a_snapshot_resynchronises(sample_dir: Path, tmp_path: Path) -> None:
    msgs = list(messages(sample_dir / SPOT))
    lines = [line for _, line, _ in msgs]
    depth = [i for i, (_, _, m) in enumerate(msgs) if "@depth" in m.get("stream", "")]
    snap_at = next(i for i, (_, _, m) in enumerate(msgs) if "lastUpdateId" in m)
    after = [i for i in depth if i > snap_at]
    gone, resync = after[100], after[300]
    # the true book just before `resync`, from the undamaged capture, as a REST snapshot
    rows, rec, _ = book_rows(sample_dir / SPOT)
    upto = rec < resync + 1  # lines are 1-based
    st = book_depth_scan(new_book_state(4096), rows["side"][upto], rows["price"][upto], rows["size"][upto],
                         np.where(rows["side"][upto] == 0, 1, 0).astype(np.uint8), np.zeros(2, np.int64))
    bids = [[repr(float(p)), repr(float(q))] for p, q in zip(*st.levels(1), strict=True)]
    asks = [[repr(float(p)), repr(float(q))] for p, q in zip(*st.levels(-1), strict=True)]
    first_u = msgs[resync][2]["data"]["U"]
    recv = lines[resync].partition(b" ")[0]
    snapshot = recv + b" " + orjson.dumps({"lastUpdateId": first_u - 1, "bids": bids, "asks": asks}) + b"\n"
    damaged = lines[:gone] + lines[gone + 1 : resync] + [snapshot] + lines[resync:]
    path = write(tmp_path / "gap.jsonl.gz", damaged)
    drows, drec, reader = book_rows(path)
    assert reader.book_gaps == 1
    gap_row = np.flatnonzero(drows["side"] == 0)
    assert len(gap_row) == 3  # the first snapshot's clear, the gap's clear, the resync's clear
    # after the resync the book is the true one again, line for line
    true_top, got_top = tops(rows), tops(drows)
    true_last = {int(x): i for i, x in enumerate(rec)}
    checked = 0  # one line removed and one inserted before `resync`: later lines keep their numbers
    for j, line_no in enumerate(drec):
        if line_no <= resync or (j + 1 < len(drec) and drec[j + 1] == line_no):
            continue
        orig = int(line_no)
        if orig in true_last:
            assert np.array_equal(got_top[j], true_top[true_last[orig]], equal_nan=True)
            checked += 1
    assert checked > 100


@pytest.mark.slow
def test_usdm_uses_the_pu_rule(shared_data: Path, tmp_path: Path) -> None:
    msgs = list(messages(shared_data / USDM))
    lines = [line for _, line, _ in msgs]
    snap_at = next(i for i, (_, _, m) in enumerate(msgs) if "lastUpdateId" in m)
    depth = [i for i, (_, _, m) in enumerate(msgs) if "@depth" in m.get("stream", "") and i > snap_at]
    path = write(tmp_path / "gap.jsonl.gz", lines[: depth[50]] + lines[depth[50] + 1 :])
    rows, _, reader = book_rows(path)
    assert reader.book_gaps == 1 and (rows["side"] == 0).sum() == 2


def test_a_damaged_snapshot_is_one_bad_line_and_adds_no_row(sample_dir: Path, tmp_path: Path) -> None:
    msgs = list(messages(sample_dir / SPOT))
    lines = [line for _, line, _ in msgs]
    snap_at = next(i for i, (_, _, m) in enumerate(msgs) if "lastUpdateId" in m)
    lines[snap_at] = lines[snap_at].replace(b'"bids":[["', b'"bids":[["x', 1)
    path = write(tmp_path / "bad-snap.jsonl.gz", lines)
    r = Replay([Source(path, options={"book": True}, policy="reject")])
    kinds = np.concatenate([b["kind"] for b in r.iter_arrays()])
    t = r.accounting.total
    assert t.rejected == 1 and (kinds == KIND_BOOK).sum() == 0  # no snapshot: no book, never a wrong one
    assert t.read == t.delivered + t.rejected
