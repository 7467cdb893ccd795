"""The book stage: per-symbol books from KIND_BOOK rows, against the plain loop, for any batch split."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import orjson
import pytest
from book_reference import reference

from nautilus_pipeline.app import Run
from nautilus_pipeline.errors import ConfigError, DataError
from nautilus_pipeline.events import KIND_BOOK, KIND_QUOTE, KIND_TRADE
from nautilus_pipeline.io import Replay, Source
from nautilus_pipeline.io.checks import Validator
from nautilus_pipeline.io.chunk import Reason, TickChunk
from nautilus_pipeline.kernels.book import ACTION_CLEAR, ACTION_SET, BOOK_FEATURE_NAMES
from nautilus_pipeline.pipeline import Pipeline
from nautilus_pipeline.stage import Stage
from nautilus_pipeline.stages import BookStage, FeaturesStage
from nautilus_pipeline.stages.book import BOOK_FEATURES_COLUMN, LEVEL_COLUMNS

PACKAGE_DATA = Path(__file__).resolve().parents[1] / "nautilus_pipeline" / "data"
MBO = PACKAGE_DATA / "databento-glbx-esh4-mbo-20231225-head.dbn.zst"
LEVELS = 5


class Capture(Stage):
    name = "capture"

    def __init__(self, columns):
        self.reads = tuple(columns)
        self.got: dict[str, list[np.ndarray]] = {c: [] for c in columns}

    async def process(self, lease, stream, ctx):
        for c in self.reads:
            self.got[c].append(lease[c].copy())

    def column(self, name):
        return np.concatenate(self.got[name])


def same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and bool(((a == b) | (np.isnan(a) & np.isnan(b))).all())


def mbo_ticks() -> dict[str, np.ndarray]:
    blocks = list(Replay([Source(MBO, options={"trades": True})]).iter_arrays())
    return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


def held_at_event_ends(feats, lv, point):
    """Plain loop: each row repeats the book of the last publish point (an event's end) at or
    before it; ofi between consecutive published tops at the points, 0 elsewhere."""
    out_f, out_lv = feats.copy(), lv.copy()
    hf = np.full(feats.shape[1], np.nan)
    hf[-1] = 0.0
    hlv = np.full(lv.shape[1:], np.nan)
    for i in range(len(point)):
        if point[i]:
            b0, qb0, a0, qa0 = hlv[:, 0]
            b, qb, a, qa = lv[i, :, 0]
            e = 0.0
            if not any(math.isnan(x) for x in (b, a, b0, a0)):
                e = (qb if b >= b0 else 0.0) - (qb0 if b <= b0 else 0.0) - (qa if a <= a0 else 0.0) \
                    + (qa0 if a >= a0 else 0.0)
            hf, hlv = feats[i].copy(), lv[i].copy()
            hf[-1] = e
            out_f[i], out_lv[i] = hf, hlv
            hf = hf.copy()
            hf[-1] = 0.0
        else:
            out_f[i], out_lv[i] = hf, hlv
    return out_f, out_lv


def loop_books(data: dict[str, np.ndarray], levels: int = LEVELS, publish: str = "event"):
    """Per symbol, the loop reference over its rows (non-book rows leave the book as it is);
    with ``publish="event"`` held between event ends (``trade_id`` 1 or -1 on book rows)."""
    n = len(data["ts_ns"])
    feats = np.empty((n, len(BOOK_FEATURE_NAMES)))
    lv = np.empty((n, 4, levels))
    for key in np.unique(data["symbol_id"]):
        rows = np.flatnonzero(data["symbol_id"] == key)
        book = data["kind"][rows] == KIND_BOOK
        side = np.where(book, data["side"][rows], 0)
        action = np.where(book & (side == 0), ACTION_CLEAR, ACTION_SET)
        price = np.where(book, data["price"][rows], np.nan)
        size = np.where(book, data["size"][rows], np.nan)
        f, v = reference(side.tolist(), price.tolist(), size.tolist(), action.tolist(), levels=max(levels, 1))
        if publish == "event":
            event = data.get("trade_id", np.full(n, -1))[rows]
            f, v = held_at_event_ends(f, v, book & (event != 0))
        feats[rows], lv[rows] = f, v[:, :, :levels]
    return feats, lv


async def run_book(data, batch_size, *, extra=(), capacity=None, publish="event"):
    book = BookStage(levels=LEVELS, publish=publish, **({} if capacity is None else {"capacity": capacity}))
    cap = Capture((BOOK_FEATURES_COLUMN, *LEVEL_COLUMNS, "bid", "ask", "bid_size", "ask_size", *extra))
    stages = [book, *([FeaturesStage()] if extra else []), cap]
    async with Pipeline(stages, batch_size=batch_size, slabs=4, memory="host") as pipe:
        await pipe.ingest(data)
        await pipe.drain()
    return book, cap


@pytest.fixture(scope="module")
def mbo_data():
    data = mbo_ticks()
    return data, loop_books(data)


@pytest.mark.parametrize("batch_size", [7, 1000, 4096])
async def test_real_mbo_book_features_equal_the_loop_for_any_batch_size(mbo_data, batch_size) -> None:
    data, (want_feats, want_lv) = mbo_data
    assert (data["kind"] == KIND_TRADE).sum() == 122 and (data["kind"] == KIND_BOOK).sum() > 10_000
    book, cap = await run_book(data, batch_size)
    assert same(cap.column(BOOK_FEATURES_COLUMN), want_feats)
    for i, col in enumerate(LEVEL_COLUMNS):
        assert same(cap.column(col), want_lv[:, i, :])
    assert book.stats()["book_rows"] == int((data["kind"] == KIND_BOOK).sum())
    assert book.stats()["clears"] == 1  # the snapshot at the start
    assert (book.stats()["levels_evicted"], book.stats()["rows_inexact"]) == (0, 0) and "notes" not in book.stats()


@pytest.mark.parametrize("batch_size", [7, 4096])
async def test_a_capacity_below_the_books_depth_is_counted_and_never_publishes_a_wrong_number(
        mbo_data, batch_size) -> None:
    """The bundled ESH4 book is hundreds of levels deep; with 16 kept per side levels are
    pushed out: the stage counts them (stats and a note in the run summary), and every number
    it still writes equals the full loop book's (NaN only where a feature needed a forgotten level)."""
    data, _ = mbo_data
    want_feats, want_lv = loop_books(data, publish="row")  # per delta: the kernel's own rows
    book, cap = await run_book(data, batch_size, capacity=16, publish="row")
    got = cap.column(BOOK_FEATURES_COLUMN)
    known = ~np.isnan(got)
    assert np.array_equal(got[known], want_feats[known])
    for i, col in enumerate(LEVEL_COLUMNS):
        g = cap.column(col)
        assert np.array_equal(g[~np.isnan(g)], want_lv[:, i, :][~np.isnan(g)])
    st = book.stats()
    assert st["levels_evicted"] > 0 and st["updates_beyond_capacity"] > 0
    unknown = (np.isnan(got) & ~np.isnan(want_feats)).any(axis=1)
    assert st["rows_inexact"] == int(unknown.sum()) > 0  # a forgotten level means the full book has a number
    assert "capacity 16 levels per side" in st["notes"][0]


async def test_book_rows_carry_the_top_of_book_as_quotes_and_trades_keep_theirs(mbo_data) -> None:
    data, (_, want_lv) = mbo_data
    _, cap = await run_book(data, 4096)
    is_book = data["kind"] == KIND_BOOK
    for i, col in enumerate(("bid", "bid_size", "ask", "ask_size")):
        got = cap.column(col)
        assert same(got[is_book], want_lv[is_book, i, 0])
        assert np.isnan(got[~is_book]).all()  # the trades' quote columns are untouched (NaN)
    # CME's pre-open book (Dec 25, before 18:00 ET) is crossed, as auctions are; once the open
    # has uncrossed it (23:00:03 UTC), no published book is (features at F_LAST event ends),
    # while per delta (publish="row") 2 rows inside one exchange event are, between two F_LAST
    # records (tests/test_books_mbo.py: never at an event's last delta)
    _, per_row = await run_book(data, 4096, publish="row")
    for c, n_crossed in ((cap, 0), (per_row, 2)):
        live = is_book & np.isfinite(c.column("bid")) & np.isfinite(c.column("ask"))
        opened = live & (data["ts_ns"] > 1_703_545_203 * 10**9)
        assert opened.sum() > 1000 and (c.column("bid")[opened] >= c.column("ask")[opened]).sum() == n_crossed


async def test_the_features_stage_reads_book_rows_as_quotes(mbo_data) -> None:
    data, (_, want_lv) = mbo_data
    _, cap = await run_book(data, 4096, extra=("features",))
    feats = cap.column("features")
    names = FeaturesStage().names
    spread = feats[:, names.index("spread")]
    is_book = data["kind"] == KIND_BOOK
    assert same(spread[is_book], want_lv[is_book, 2, 0] - want_lv[is_book, 0, 0])


async def test_several_symbols_interleaved_keep_their_own_books() -> None:
    rng = np.random.default_rng(3)
    n = 3000
    sym = rng.integers(0, 3, n).astype(np.uint32)
    kind = rng.choice([KIND_BOOK] * 8 + [KIND_TRADE, KIND_QUOTE], n).astype(np.uint8)
    side = np.where(kind == KIND_BOOK, rng.choice([1, -1], n), rng.choice([1, -1], n)).astype(np.int8)
    side[(kind == KIND_BOOK) & (rng.random(n) < 0.01)] = 0  # clears
    mid = 100.0 + sym
    price = np.where(side == 1, mid - rng.integers(1, 12, n) / 4, mid + rng.integers(1, 12, n) / 4)
    price[(kind == KIND_BOOK) & (side == 0)] = np.nan
    size = rng.choice([0.0, 1.0, 2.0, 5.0], n)
    size[kind == KIND_TRADE] += 1.0
    data = {"ts_ns": np.arange(n, dtype=np.int64), "symbol_id": sym, "kind": kind, "side": side,
            "price": price, "size": size,
            "bid": np.where(kind == KIND_QUOTE, 99.0, np.nan), "ask": np.where(kind == KIND_QUOTE, 101.0, np.nan),
            "bid_size": np.where(kind == KIND_QUOTE, 1.0, np.nan),
            "ask_size": np.where(kind == KIND_QUOTE, 1.0, np.nan)}
    want_feats, want_lv = loop_books(data)
    for batch in (1, 64, 4096):
        _, cap = await run_book(data, batch)
        assert same(cap.column(BOOK_FEATURES_COLUMN), want_feats)
        assert same(cap.column("book_ask_size"), want_lv[:, 3, :])
        quote = kind == KIND_QUOTE
        assert (cap.column("bid")[quote] == 99.0).all()  # quotes pass as they are
    # exchange events of 1-4 book rows (trade_id 0 inside, 1 at the end), held across batches
    data["trade_id"] = np.where(kind == KIND_BOOK, (rng.random(n) < 0.4).astype(np.int64), -1)
    want_feats, want_lv = loop_books(data)
    assert not same(want_feats, loop_books(data, publish="row")[0])
    for batch in (1, 7, 4096):
        _, cap = await run_book(data, batch)
        assert same(cap.column(BOOK_FEATURES_COLUMN), want_feats)
        assert same(cap.column("book_bid_price"), want_lv[:, 0, :])


async def test_snapshot_and_restore_continue_the_books_exactly(mbo_data) -> None:
    from nautilus_pipeline.snapshot import SnapshotError

    data, (want_feats, _) = mbo_data
    half = 6001
    first = {k: v[:half] for k, v in data.items()}
    rest = {k: v[half:] for k, v in data.items()}
    book, cap1 = await run_book(first, 4096)
    snap = book.snapshot()  # versioned bytes, as a chain of jobs carries them
    resumed = BookStage(levels=LEVELS)
    cap2 = Capture((BOOK_FEATURES_COLUMN,))
    async with Pipeline([resumed, cap2], batch_size=512, slabs=4, memory="host") as pipe:
        resumed.restore(snap)  # after start(), as a resumed run does
        await pipe.ingest(rest)
        await pipe.drain()
    got = np.concatenate([cap1.column(BOOK_FEATURES_COLUMN), cap2.column(BOOK_FEATURES_COLUMN)])
    assert same(got, want_feats)
    assert resumed.stats()["book_rows"] == int((data["kind"] == KIND_BOOK).sum())
    with pytest.raises(SnapshotError):
        BookStage(levels=LEVELS, capacity=32).restore(snap)  # other parameters: refused


def test_levels_and_capacity_are_checked() -> None:
    with pytest.raises(ConfigError, match="levels must be an integer >= 0"):
        BookStage(levels=-1)
    with pytest.raises(ConfigError, match="capacity must be an integer >= 10"):
        BookStage(capacity=4)
    with pytest.raises(ConfigError, match="cannot exceed capacity"):
        BookStage(levels=20, capacity=10)
    assert [c.name for c in BookStage(levels=0).writes] == [BOOK_FEATURES_COLUMN]


def test_bad_book_rows_are_refused_with_their_reason() -> None:
    cols = {"ts_ns": np.arange(6, dtype=np.int64), "kind": np.full(6, KIND_BOOK, dtype=np.uint8),
            "side": np.array([1, -1, 2, 0, 1, 0], dtype=np.int8),
            "price": np.array([100.0, -1.0, 100.0, 99.0, 100.0, np.nan]),
            "size": np.array([1.0, 1.0, 1.0, 0.0, np.nan, 0.0]),
            "symbol_id": np.zeros(6, dtype=np.uint32)}
    chunk = TickChunk("t.csv", cols, np.arange(1, 7), ["X"])
    v = Validator("t.csv", "reject")
    kept = v.process(chunk)
    assert kept.records.tolist() == [1, 6]
    assert dict(v.accounting.total.by_reason) == {
        Reason.PRICE_NOT_POSITIVE.name.lower(): 1, Reason.UNKNOWN_SIDE.name.lower(): 2,
        Reason.SIZE_NOT_POSITIVE.name.lower(): 1}
    with pytest.raises(DataError, match="line/record 2"):
        Validator("t.csv", "fail").process(chunk)


async def test_bundled_book_pipeline_runs_end_to_end(tmp_path: Path) -> None:
    run = Run("book", outputs=False)
    summary = await run.execute()
    t = summary.ticks
    assert t.read == t.delivered == 12_180 and t.rejected == t.quarantined == 0
    book = next(s for s in summary.stages if s["stage"] == "book")
    assert book["book_rows"] == 12_058 and book["symbols"] == 1
    assert math.isfinite(book["rows_per_s"])


def test_inspect_reports_the_book_of_an_mbo_file(capsys) -> None:
    from nautilus_pipeline.cli import main

    assert main(["inspect", str(MBO), "--json"]) == 0
    (info,) = orjson.loads(capsys.readouterr().out)
    assert info["book_updates"] == 12_057 and info["book_snapshots"] == 1
    assert info["quotes"] == 0 and info["ticks"] == 12_058
    assert info["book_gaps"] == 0 and info["book_unknown_orders"] == 0
    # the deepest each side got, from a plain dict book over the same rows
    data = mbo_ticks()
    book = data["kind"] == KIND_BOOK
    levels = {1: {}, -1: {}}
    deepest = {1: 0, -1: 0}
    for s, p, q in zip(data["side"][book].tolist(), data["price"][book].tolist(),
                       data["size"][book].tolist(), strict=True):
        if s == 0:
            levels = {1: {}, -1: {}}
            continue
        if q > 0:
            levels[s][p] = q
        else:
            levels[s].pop(p, None)
        deepest[s] = max(deepest[s], len(levels[s]))
    assert info["book_levels_max"] == {"bid": deepest[1], "ask": deepest[-1]}


def test_a_file_without_book_rows_has_no_book_fields(sample_dir, capsys) -> None:
    from nautilus_pipeline.cli import main

    assert main(["inspect", str(sample_dir / "databento-glbx-futures-mbp1-20240701.dbn.zst"), "--json"]) == 0
    (info,) = orjson.loads(capsys.readouterr().out)
    assert "book_updates" not in info and info["quotes"] == 2_288
